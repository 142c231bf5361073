"""Grid throughput of packed sweeps (BENCHMARKS.md, "Packed sweeps"):

    python bench/sweep_pack.py [--runs 4] [--per-device 1,2] [--repeats 3] [--device cpu]

Runs the same sweep (``--runs`` seeds of FedAvg on EMNIST-47, mlp 200-200, 10 of 47 clients
per round, K = 5, 40 rounds; or cnn_emnist with ``--model``) with ``dist-gradalign sweep
--per-device N`` for each N, into a fresh directory each time, and reports runs per hour
(wall time of the whole sweep command). The N values alternate within each repeat; the median
of ``--repeats`` is reported, with the ratio to N = 1 computed per repeat. On CPU run it on an
otherwise idle machine.

Results go to ``bench/results/sweep_pack-<host>-<device>-<model>.json`` and print as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EMNIST47 = REPO.parent / "shared" / "data" / "emnist47" / "emnist47.npz"


def sweep_file(tmp: Path, runs: int, model: str, device: str) -> Path:
    base = tmp / "base.yaml"
    base.write_text(yaml.safe_dump({
        "data": {"source": "npz", "root": str(EMNIST47), "normalize": [0.5, 0.5]},
        "model": {"name": model}, "partition": {"scheme": "iid", "num_clients": 47},
        "algorithm": {"name": "fedavg", "lr": 0.05, "local_steps": 5, "local_batch_size": 32},
        "train": {"rounds": 40, "clients_per_round": 10, "eval_every": 20, "device": device,
                  "executor": "sequential"}}))
    spec = tmp / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"config": str(base), "name": "pack", "root": str(tmp / "runs"),
                                    "grid": {"seed": list(range(runs))}}))
    return spec


def one(spec: Path, per_device: int) -> float:
    root = spec.parent / "runs"
    subprocess.run(["rm", "-rf", str(root)], check=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dist_gradalign", "sweep", str(spec), "--per-device",
                           str(per_device)], cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"sweep --per-device {per_device} failed:\n{proc.stderr[-3000:]}")
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--per-device", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="mlp")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    ns = [int(n) for n in args.per_device.split(",")]
    times: dict[int, list[float]] = {n: [] for n in ns}
    with tempfile.TemporaryDirectory() as tmp:
        spec = sweep_file(Path(tmp), args.runs, args.model, args.device)
        for rep in range(args.repeats):
            for n in ns:
                times[n].append(one(spec, n))
                print(f"repeat {rep + 1}: --per-device {n}: {times[n][-1]:.1f} s", flush=True)
    result = {"machine": platform.node(), "device": args.device, "model": args.model, "runs": args.runs,
              "times_s": {str(n): t for n, t in times.items()}}
    out = REPO / "bench" / "results" / f"sweep_pack-{platform.node()}-{args.device}-{args.model}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"| --per-device | sweep of {args.runs} runs, wall s (median; runs) | runs per hour | "
          "speed-up vs 1 (median of per-repeat ratios) |\n|---:|---|---:|---:|")
    for n in ns:
        med = statistics.median(times[n])
        ratio = statistics.median(a / b for a, b in zip(times[ns[0]], times[n]))
        print(f"| {n} | {med:.1f} ({', '.join(f'{t:.1f}' for t in times[n])}) | {3600 * args.runs / med:.0f} | "
              f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
