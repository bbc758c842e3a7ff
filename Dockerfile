# The pipeline image: `docker run` runs the seed study (CPU PyTorch by default).
#   docker build -t vitflow .
#   docker run --rm -v "$PWD/data:/data" -v "$PWD/mlflow:/app/mlflow" vitflow
#   docker run --rm -v ... vitflow vitflow run --config smoke
# CUDA: build on an NVIDIA base and take the default (CUDA) PyTorch wheels, then run with --gpus all:
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 --build-arg TORCH_INDEX= -t vitflow:cuda .
# (that base needs python3/pip; the slim Python base below is the tested default.)
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    VITFLOW_DATA_DIR=/data

RUN useradd --create-home --uid 1000 vitflow
WORKDIR /app

# Dependencies first, so code edits do not reinstall torch.
COPY pyproject.toml README.md ./
RUN if [ -n "$TORCH_INDEX" ]; then pip install --index-url "$TORCH_INDEX" torch torchvision; fi \
 && mkdir -p pipeline flows && touch pipeline/__init__.py flows/__init__.py \
 && pip install . && pip uninstall -y vitflow

COPY pipeline/ pipeline/
COPY flows/ flows/
COPY configs/ configs/
COPY mlflow/server.sh mlflow/README.md mlflow/
RUN pip install --no-deps -e . \
 && mkdir -p /data /app/mlflow /app/models \
 && chown -R vitflow:vitflow /data /app

USER vitflow
# Prefect's database (in the user's PREFECT_HOME), migrated at build time: otherwise every container's first
# study would create it while it boots its temporary API server (~5 s on 2 cores).
RUN prefect server database upgrade -y
VOLUME ["/data", "/app/mlflow"]
CMD ["vitflow", "run", "--config", "seed"]
