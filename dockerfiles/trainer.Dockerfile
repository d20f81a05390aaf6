# syntax=docker/dockerfile:1.7
# The trainer image: training, quantization and serving pods. Multi-arch (amd64 for H100/H200,
# arm64 for GB200):
#   docker buildx build --platform linux/amd64,linux/arm64 -f dockerfiles/trainer.Dockerfile -t REPO/trainer:TAG .
# The CUDA base is pinned to an exact release; pin it by digest in your registry mirror.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/wam \
    PATH=/opt/wam/bin:$PATH

# Python, the FFmpeg libraries torchcodec links against (PyAV and DALI bundle their own), and Mesa's EGL for
# MuJoCo's offscreen rendering (`wam sim`, MUJOCO_GL=egl).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \
      libavcodec60 libavformat60 libavutil58 libswscale7 libswresample4 libavdevice60 libavfilter9 libegl-mesa0 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv $VIRTUAL_ENV

# torch first, from the CUDA index, so that no resolver picks another build later.
RUN pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app app
COPY platform platform
COPY trainer trainer
COPY operators operators
# openpi-client with --no-deps: it pins numpy<2 but runs on numpy 2 (its dependencies come with the extra).
# torchao: the FP4 matmuls of the policy server on Blackwell GPUs.
RUN pip install ".[trainer]" torchao==0.18.0 \
 && pip install --no-deps openpi-client==0.1.2 \
 && python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')" \
 && rm -rf /src

# Non-root; the pods mount /workspace, /tmp and /dev/shm, the root filesystem stays read-only.
RUN useradd --uid 1000 --user-group --home-dir /workspace --no-create-home wam \
 && mkdir -p /workspace && chown 1000:1000 /workspace
USER 1000:1000
WORKDIR /workspace
ENV HOME=/workspace
ENTRYPOINT []
CMD ["wam", "--help"]
