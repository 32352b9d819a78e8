# zsharp on a CUDA PyTorch image: the library, the command line, the Snakemake workflow and
# its SLURM executor plugin. The default command runs the workflow in /work.
#
#   docker build -t zsharp .
#   docker run --gpus all --rm -v "$PWD/work:/work" -e WANDB_API_KEY zsharp \
#       snakemake -s /opt/zsharp/Snakefile --cores all --resources gpu=1
#
# BASE_IMAGE must provide Python ≥ 3.10 with torch ≥ 2.4 and torchvision (pip keeps them).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

WORKDIR /opt/zsharp
# One layer with the package, its build hook and the workflow (.dockerignore lets in only
# these), one with the install and the user: each layer is a full copy of the base under
# some storage drivers (vfs).
COPY . .
# The project itself: its dependency ranges live in pyproject.toml (the base image's torch
# satisfies torch>=2.4), so there is no version to pin here. Run as an ordinary user;
# /work holds data/, results/, logs/ and Snakemake's .snakemake/.
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir ".[workflow]" \
    && python -c "import torch, zsharp.optim; print('torch', torch.__version__)" \
    && useradd --create-home --uid 1000 --shell /bin/bash zsharp \
    && mkdir -p /work \
    && chown zsharp:zsharp /work
USER 1000:1000
WORKDIR /work

CMD ["snakemake", "-s", "/opt/zsharp/Snakefile", "--cores", "all"]
