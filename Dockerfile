# dist_gradalign on the official Python image, with exactly the torch and torchvision that every
# CI run tests (requirements.txt). PyPI's torch wheel for Linux x86_64 is a CUDA build that brings
# its CUDA libraries (cuDNN, NCCL) as pip packages, so the image needs only the host's NVIDIA
# driver and the NVIDIA Container Toolkit for `--gpus all`; without a GPU it runs on CPU (gloo).
#
#   docker build -t dist-gradalign .
#   docker run --gpus all --ipc=host -e NPROC_PER_NODE=8 -e WANDB_API_KEY \
#       -v $PWD/data:/workspace/data -v $PWD/runs:/workspace/runs \
#       dist-gradalign train configs/paper/cifar10-iid-fedga.yaml
#
# The entry point runs `torchrun --standalone --nproc_per_node $NPROC_PER_NODE -m dist_gradalign ARGS`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NPROC_PER_NODE=1

# train.compile: inductor (CPU) and triton (GPU) build their kernels with a C compiler
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
COPY setup.cfg pyproject.toml README.md ./
COPY dist_gradalign ./dist_gradalign
RUN pip install torch==2.14.1 torchvision==0.29.1 && pip install . \
    && python -c "import dist_gradalign, torch; print('dist_gradalign on torch', torch.__version__)"
COPY configs ./configs
COPY slurm ./slurm

ENTRYPOINT ["/bin/sh", "-c", "exec torchrun --standalone --nproc_per_node \"$NPROC_PER_NODE\" -m dist_gradalign \"$@\"", "dist-gradalign"]
CMD ["--help"]
