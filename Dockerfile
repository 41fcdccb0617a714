# CUDA image with otfuse installed in editable mode; the repository is mounted over /workspace/otfuse.
# pyproject.toml bounds torch to the releases the suite runs under (2.11 to 2.14): pip replaces the base image's
# older torch with one of those (and its CUDA libraries) while installing otfuse.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /workspace/otfuse
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir -e ".[dev]"
ENV OTFUSE_DATA_DIR=/data
CMD ["bash"]
