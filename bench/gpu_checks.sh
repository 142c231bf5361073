#!/usr/bin/env bash
# The GPU measurements that issue 13 still lacks, in one device call of about 8 minutes.
# Every step has its own time limit, and whatever finished comes back under $OUT.
#
# Here, once (the data is read from ../shared/data on the device too; .gpu-data is git-ignored):
#   mkdir -p .gpu-data && cp -r ../shared/data/emnist47 .gpu-data/
# Then, with the device tool:  run  command="bash bench/gpu_checks.sh"  carry=[".gpu-data"]
#
# 1. tests/test_gpu.py on CUDA (compile against eager, both executors; the auto rule; NCCL).
# 2. Trainer overhead: a FedAvg round / a bare loop, eager and train.compile (goal <= 1.00).
# 3. The vectorized executor's throughput by clients per rank (the auto rule's GPU threshold).
# 4. Packed sweeps: grid throughput with 1, 2, 4 and 8 cnn_emnist runs on the GPU at once.
set -uo pipefail
out="${OUT:-runs/gpu-checks}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ ! -e ../shared/data/emnist47/emnist47.npz ] && [ -e .gpu-data/emnist47/emnist47.npz ]; then
  mkdir -p ../shared/data && ln -sfn "$PWD/.gpu-data/emnist47" ../shared/data/emnist47
fi
{ nvidia-smi -L; "$py" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"; } \
  > "$out/env.txt" 2>&1
step() {  # step NAME SECONDS CMD...: run CMD under a limit; its output to $out/NAME.txt; status to $out/status.txt
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name rc=$? $((SECONDS - t0))s" | tee -a "$out/status.txt"
}
step test_gpu 150 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step overhead 120 "$py" bench/perf.py --device cuda --sections overhead --repeats 7 --out "$out/perf-overhead.json"
step vectorized 90 "$py" bench/perf.py --device cuda --sections vectorized --repeats 5 --out "$out/perf-vectorized.json"
step sweep_pack 120 "$py" bench/sweep_pack.py --device cuda --model cnn_emnist --per-device 1,2,4,8 --repeats 2
cp bench/results/sweep_pack-*-cuda-*.json "$out/" 2>/dev/null
exit 0
