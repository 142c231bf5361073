#!/usr/bin/env bash
# Set up (idempotent), then train on scikit-learn's bundled 8x8 digits (no download) with
# 2 ranks under torchrun: GradAlign vs large-batch SGD (datacenter, by updates) and
# FedGA vs FedAvg (federated, heterogeneous clients), and print them side by side.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. launch/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
nproc="${NPROC:-2}"
for algo in lbsgd gradalign fedavg fedga; do
  torchrun --standalone --nproc_per_node "$nproc" -m dist_gradalign train \
    "configs/quickstart/$algo.yaml" train.progress=false --overwrite "$@"
done
echo
echo "Datacenter: GradAlign vs large-batch SGD (same batch per update, compared by updates)"
dist-gradalign summary runs/quickstart/lbsgd runs/quickstart/gradalign --target 0.9
echo
echo "Federated, one class per client: FedGA vs FedAvg"
dist-gradalign summary runs/quickstart/fedavg runs/quickstart/fedga --target 0.8
