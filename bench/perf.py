"""Performance ratios measured in one process, one run (BENCHMARKS.md, "Performance").

    python bench/perf.py [--device cpu|cuda] [--repeats 7] [--out runs/bench/perf-<device>.json]

1. GradAlign update time / large-batch SGD update time at the same per-rank batch
   (8 clients x 64 samples; the arithmetic limit is 2.0: two gradient evaluations).
2. Trainer overhead: a FedAvg round through the trainer / the same forward-backward work in a
   bare hand-written single-process loop (10 clients, K = 5, batch 32).
3. Client throughput, vectorized vs sequential executor, m = 1, 5, 10, 47 clients per rank.

EMNIST-47 (../shared/data) with the paper's cnn_emnist. Each timing is the median of
``--repeats`` rounds after one warm-up round; the two sides of every ratio are measured
alternately so that drift in the machine's speed hits both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_gradalign.backend import Backend
from dist_gradalign.config import load_config
from dist_gradalign.engine import Trainer
from dist_gradalign.executor import local_batches

BASE = "configs/offline/emnist-iid-fedavg.yaml"


def trainer(device: str, *overrides: str) -> Trainer:
    cfg = load_config(BASE, ["run_dir=/tmp/dga-perf", "train.progress=false", f"train.device={device}",
                             "algorithm.weight_decay=0", *overrides])
    return Trainer(cfg, Backend.from_env(device))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def alternate(a, b, repeats: int, device: str) -> tuple[float, float]:
    """Median seconds of a() and b(), measured alternately after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, device))
        tb.append(timed(b, device))
    return statistics.median(ta), statistics.median(tb)


def round_fn(t: Trainer):
    state = {"r": 0}

    def run():
        state["r"] += 1
        t.run_round(state["r"])
    return run


def bare_fedavg(t: Trainer):
    """The same clients, batches and SGD steps as a FedAvg round, hand-written: a plain module,
    autograd, in-place updates, then the weighted average. No trainer, no flat buffers."""
    cfg = t.cfg
    model = type(t.fm.module)(1, 28, 47).to(t.x.device)  # CNNEmnist(in_channels, side, classes)
    params = list(model.parameters())
    state = {"r": 0}

    def run():
        state["r"] += 1
        clients = t.round_clients(state["r"])
        sizes = [t.sizes[c] for c in clients]
        avg = [torch.zeros_like(p) for p in params]
        x0 = [p.detach().clone() for p in params]
        for c, n in zip(clients, sizes):
            with torch.no_grad():
                for p, v in zip(params, x0):
                    p.copy_(v)
            shard = torch.as_tensor(t.shards_np[c], device=t.x.device)
            for pos in local_batches(cfg.seed, state["r"], c, n, cfg.algorithm.local_steps,
                                     cfg.algorithm.local_batch_size):
                idx = shard[pos.to(t.x.device)]
                loss = F.cross_entropy(model(t.x_train[idx]), t.y_train[idx])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(g, alpha=cfg.algorithm.lr)
            with torch.no_grad():
                for a, p in zip(avg, params):
                    a.add_(p, alpha=n / sum(sizes))
        with torch.no_grad():
            for p, a in zip(params, avg):
                p.copy_(a)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, reps = args.device, args.repeats
    machine = (torch.cuda.get_device_name() if dev == "cuda" else
               f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
               f"{torch.get_num_threads()} threads")
    out = {"machine": machine, "torch": torch.__version__, "device": dev, "repeats": reps, "rows": []}

    dc = ["partition.num_clients=8", "train.clients_per_round=8", "algorithm.local_steps=1",
          "algorithm.local_batch_size=64", "algorithm.lr=0.2"]
    lb, ga = trainer(dev, *dc, "algorithm.name=lbsgd"), trainer(dev, *dc, "algorithm.name=gradalign", "algorithm.beta=0.05")
    t_lb, t_ga = alternate(round_fn(lb), round_fn(ga), reps, dev)
    out["rows"].append({"what": "gradalign / lbsgd update time", "config": "cnn_emnist, 8 clients x 64 per update",
                        "a_s": t_ga, "b_s": t_lb, "ratio": t_ga / t_lb, "limit": 2.0})

    fed = ["algorithm.name=fedavg", "algorithm.local_steps=5", "algorithm.local_batch_size=32",
           "train.clients_per_round=10", "algorithm.lr=0.05"]
    fa = trainer(dev, *fed)
    bare = trainer(dev, *fed)
    t_fa, t_bare = alternate(round_fn(fa), bare_fedavg(bare), reps, dev)
    out["rows"].append({"what": "fedavg round, trainer / bare loop", "config": "cnn_emnist, 10 clients, K=5, batch 32",
                        "a_s": t_fa, "b_s": t_bare, "ratio": t_fa / t_bare, "limit": 1.0})

    for model in ("cnn_emnist", "mlp"):
        for m in (1, 5, 10, 47):
            common = [*fed, f"model.name={model}", "model.hidden=[200,200]", f"train.clients_per_round={m}"]
            seq, vec = trainer(dev, *common), trainer(dev, *common, "train.executor=vectorized")
            t_seq, t_vec = alternate(round_fn(seq), round_fn(vec), reps, dev)
            samples = m * 5 * 32
            out["rows"].append({"what": f"vectorized vs sequential, m={m}", "config": f"{model}, K=5, batch 32",
                                "a_s": t_vec, "b_s": t_seq, "ratio": t_seq / t_vec, "limit": None,
                                "samples_per_s_sequential": samples / t_seq, "samples_per_s_vectorized": samples / t_vec})

    print(f"machine: {machine}; torch {torch.__version__}; median of {reps} rounds")
    print(f"{'measurement':40s} {'config':40s} {'a (s)':>8s} {'b (s)':>8s} {'ratio':>7s}")
    for r in out["rows"]:
        print(f"{r['what']:40s} {r['config']:40s} {r['a_s']:8.4f} {r['b_s']:8.4f} {r['ratio']:7.3f}")
    path = Path(args.out or f"runs/bench/perf-{dev}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
