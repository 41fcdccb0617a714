# CUDA image with otfuse installed in editable mode; the repository is mounted over /workspace/otfuse.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /workspace/otfuse
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir -e ".[dev]"
ENV OTFUSE_DATA_DIR=/data
CMD ["bash"]
