# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t finetune-operator:0.1.0 .   # kopf operator, never torch
#   docker build --target trainer  -t finetune-trainer:0.1.0 .    # torch, transformers, datasets
# Dependencies come from pyproject.toml's extras (`.[operator]`, `.[trainer]`), so the images carry
# the same pins as the tests. Both run as the numeric user 1000 (the PyTorchJob pods set
# runAsUser/runAsGroup 1000 and a read-only root filesystem, with /tmp and /cache writable).
# tests/chart/test_dockerfile.py lints this file with hadolint and replays the operator's
# install steps in a clean virtual environment.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------- build: a venv per target
FROM ${PYTHON_IMAGE} AS build
ARG VENV=/opt/venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer-image/ trainer-image/
RUN python -m venv "${VENV}" \
 && "${VENV}/bin/python" -m pip install --upgrade "pip==24.3.1" "setuptools==78.1.1" "wheel==0.45.1"

FROM build AS operator-build
ARG VENV=/opt/venv
RUN "${VENV}/bin/python" -m pip install ".[operator]" \
 && "${VENV}/bin/python" -m pip check

FROM build AS trainer-build
ARG VENV=/opt/venv
RUN "${VENV}/bin/python" -m pip install ".[trainer]" \
 && "${VENV}/bin/python" -m pip check

# ---------------------------------------------------------------- runtime: no compilers, no pip cache
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --gid 1000 finetune \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin finetune \
 && install -d -o 1000 -g 1000 -m 0775 /cache

FROM runtime AS operator
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Operator for FineTuneJobs (kopf)" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=operator-build /opt/venv /opt/venv
USER 1000:1000
EXPOSE 8080 8081
ENTRYPOINT ["finetune"]
CMD ["operator"]

FROM runtime AS trainer
LABEL org.opencontainers.image.title="finetune-trainer" \
      org.opencontainers.image.description="Trainer for FineTuneJobs: torch, transformers, datasets" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor
COPY --from=trainer-build /opt/venv /opt/venv
USER 1000:1000
WORKDIR /tmp
EXPOSE 9090
# The PyTorchJob's container runs `torchrun -m finetune_trainer.train --config ...`.
CMD ["torchrun", "--help"]
