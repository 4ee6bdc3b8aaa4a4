# Ferry's container images, one target per runtime:
#   docker build --target cpu -t ferry:cpu .
#   docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#     -v "$PWD/examples/model_repository:/models:ro" ferry:cpu
# The model repository is mounted read-only at /models. REST listens on 8000, gRPC on 8001
# and Prometheus metrics on 8002; arguments after the image name replace
# `ferry serve /models`.
# The `gpu` target runs onnxruntime-gpu on NVIDIA's CUDA + cuDNN runtime image:
#   docker build --target gpu -t ferry:gpu .
#   docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#     -v "$PWD/models:/models:ro" ferry:gpu
# CUDA_IMAGE's CUDA and cuDNN major versions must be those onnxruntime-gpu is built for (see
# onnxruntime's CUDA execution provider requirements). `cpu` stays the default target: it is
# the last stage.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# Build stages: Ferry and its pinned dependencies into a venv at /opt/ferry, with the same
# install steps as scripts/setup.sh (not editable here: the image holds no source tree).
FROM ${PYTHON_IMAGE} AS build-cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/ferry
COPY pyproject.toml constraints.txt README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
COPY src/ src/
RUN /opt/ferry/bin/python -m pip install --no-cache-dir --quiet --upgrade "pip>=24" \
    && /opt/ferry/bin/python -m pip install --no-cache-dir --quiet -c constraints.txt ".[cpu]"

# What every runtime image shares: a non-root user, the model mount point, the ports.
FROM ${PYTHON_IMAGE} AS runtime-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/ferry/bin:$PATH
RUN groupadd --system --gid 10001 ferry \
    && useradd --system --uid 10001 --gid ferry --no-create-home --shell /usr/sbin/nologin ferry \
    && mkdir /models
WORKDIR /models
EXPOSE 8000 8001 8002
# Asks Ferry's grpc.health.v1 service on the gRPC port; healthy only while SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "ferry.server.healthcheck", "127.0.0.1:8001"]
# SIGTERM starts Ferry's graceful drain (--shutdown-grace, 30 s by default); give `docker
# stop` longer than that: docker stop --time 40.
STOPSIGNAL SIGTERM

# GPU: Python from the base image's Ubuntu release (3.12 on 24.04); apt packages follow
# that release's security updates rather than fixed versions.
FROM ${CUDA_IMAGE} AS gpu-python
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-python AS build-gpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python3 -m venv /opt/ferry
COPY pyproject.toml constraints.txt README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
COPY src/ src/
RUN /opt/ferry/bin/python -m pip install --no-cache-dir --quiet --upgrade "pip>=24" \
    && /opt/ferry/bin/python -m pip install --no-cache-dir --quiet -c constraints.txt ".[gpu]"

# The same user, mount point, ports, health check and stop signal as runtime-base.
FROM gpu-python AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/ferry/bin:$PATH
RUN groupadd --system --gid 10001 ferry \
    && useradd --system --uid 10001 --gid ferry --no-create-home --shell /usr/sbin/nologin ferry \
    && mkdir /models
WORKDIR /models
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "ferry.server.healthcheck", "127.0.0.1:8001"]
STOPSIGNAL SIGTERM
COPY --from=build-gpu /opt/ferry /opt/ferry
USER 10001:10001
CMD ["ferry", "serve", "/models", "--gpu-fallback", "fail"]

FROM runtime-base AS cpu
COPY --from=build-cpu /opt/ferry /opt/ferry
USER 10001:10001
CMD ["ferry", "serve", "/models"]
