#!/usr/bin/env bash
# Build the otfuse CUDA image: ./build_image.sh [tag]
set -euo pipefail
cd "$(dirname "$0")"
docker build -t "${1:-otfuse:latest}" .
