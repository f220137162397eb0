# syntax=docker/dockerfile:1
# rnnlm training image, CPU or CUDA (build argument VARIANT), plus the MLflow tracking server
# image (target tracking-server). See docs/kubernetes.md, "The images".
#
#   docker build -t rnnlm:0.1.0-cpu .
#   docker build --build-arg VARIANT=cuda -t rnnlm:0.1.0-cuda .
#   docker build --target tracking-server -t rnnlm-mlflow:3.17.2 .
#   docker run --rm rnnlm:0.1.0-cpu            # prints the training CLI's help

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# The official PyTorch runtime image: torch, CUDA and cuDNN, no compilers.
ARG CUDA_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

# --- the project as a wheel (pure Python: one wheel serves both variants) ---------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rnnlm/ rnnlm/
COPY jobs/ jobs/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- CPU: a virtual environment with torch's CPU wheel, copied into a clean image -------------
FROM ${PYTHON_IMAGE} AS venv-cpu
ARG TORCH_VERSION=2.13.0
# gcc and g++ build the optional CPU kernel extension (python -m rnnlm.extensions.cpu_kernel)
# into the installed package, so the runtime image needs no compiler. DL3008 (unpinned apt
# packages): Debian's compilers of this base image are what the kernel is written for; a pin
# would break on the image's next point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
    "torch==${TORCH_VERSION}"
COPY --from=wheel /dist /dist
RUN /opt/venv/bin/pip install --no-cache-dir /dist/*.whl \
 && /opt/venv/bin/python -m rnnlm.extensions.cpu_kernel

FROM ${PYTHON_IMAGE} AS runtime-cpu
COPY --from=venv-cpu /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# --- CUDA: the PyTorch image already holds torch; add the project and its gpu extra ------------
# (nvidia-ml-py: MLflow's system metrics then include each GPU's utilisation and memory)
FROM ${CUDA_IMAGE} AS runtime-cuda
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir "$(ls /dist/*.whl)[gpu]" && rm -rf /dist

# --- MLflow tracking server (k8s/tracking) ------------------------------------------------------
FROM ${PYTHON_IMAGE} AS venv-mlflow
ARG MLFLOW_VERSION=3.17.2
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg[binary]==3.3.9"

FROM ${PYTHON_IMAGE} AS tracking-server
COPY --from=venv-mlflow /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/mlflow mlflow
USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--help"]

# --- the training image (default target) --------------------------------------------------------
# DL3006 (untagged image) misreads this: runtime-cpu / runtime-cuda are the stages above.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS training
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# A numeric user, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/rnnlm rnnlm
USER 10001:10001
WORKDIR /home/rnnlm
# No ENTRYPOINT: `docker run IMAGE rnnlm-torchrun ...` and Kubernetes' `command:` read as is.
CMD ["rnnlm-train", "--help"]
