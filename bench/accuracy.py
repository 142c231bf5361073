"""Real-data accuracy benchmark on these 2-core machines (BENCHMARKS.md).

For each experiment: a small grid search on seed 0 (through the project's own sweep code:
torchrun, one rank): the learning rate of the first-listed baselines, then each method's own
hyperparameter (mu, beta) at the baseline's best learning rate; the best configuration per
algorithm by final test accuracy (as the paper reports its grid-searched best); then seeds 1
and 2 of that configuration. ``dist-gradalign report`` on the runs listed in
``runs/bench/<experiment>/selected.json`` makes the tables and plots.

    python bench/accuracy.py emnist47-het datacenter emnist47-iid   # all: about 75 minutes here
    python bench/accuracy.py emnist47-het --report-only              # tables and plots again

Runs already finished are skipped, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from dist_gradalign.config import load_config
from dist_gradalign.report import report
from dist_gradalign.summary import read_metrics
from dist_gradalign.sweep import expand, run_local

ROOT = "runs/bench"
# CPU-sized federated round: K = 10 local steps of 32 samples, g_i on 200 samples, 100 rounds.
FED = ["train.rounds=100", "train.eval_every=10", "algorithm.local_steps=10", "algorithm.local_batch_size=32",
       "algorithm.full_grad_batch=200"]
# Stage 1: the learning rate for fedavg and scaffold; stage 2: fedprox's mu and fedga's beta at
# fedavg's best learning rate (a small grid that fits these machines).
FED_GRID = [{"algorithm.name": ["fedavg", "scaffold"], "algorithm.lr": [0.05, 0.1], "seed": [0]}]
FED_STAGE2 = [{"algorithm.name": ["fedprox"], "algorithm.mu": [0.01, 0.1], "seed": [0]},
              {"algorithm.name": ["fedga"], "algorithm.beta": [0.01, 0.05], "seed": [0]}]
# Datacenter: 8 workers (one IID shard each), every worker in every update, 8 x 64 = 512 samples
# per update, 300 updates; GradAlign against large-batch SGD.
DC = ["partition.scheme=iid", "partition.num_clients=8", "train.clients_per_round=8", "train.rounds=300",
      "train.eval_every=10", "algorithm.local_steps=1", "algorithm.local_batch_size=64"]
DC_GRID = [
    {"algorithm.name": ["lbsgd"], "algorithm.lr": [0.1, 0.2], "seed": [0]},
]
DC_STAGE2 = [{"algorithm.name": ["gradalign"], "algorithm.beta": [0.05, 0.2], "seed": [0]}]
TARGETS = {"emnist47-het": 0.5, "emnist47-iid": 0.75, "datacenter": 0.8}  # for updates-to-target
EXPERIMENTS = {
    "emnist47-het": ("configs/offline/emnist-het-fedavg.yaml", FED, FED_GRID, FED_STAGE2),
    "emnist47-iid": ("configs/offline/emnist-iid-fedavg.yaml", FED, FED_GRID, FED_STAGE2),
    "datacenter": ("configs/offline/emnist-iid-fedavg.yaml", DC, DC_GRID, DC_STAGE2),
}
SEEDS = [1, 2]


def final_acc(run_dir: Path) -> float:
    rows = [r for r in read_metrics(run_dir) if "test_acc" in r]
    return rows[-1]["test_acc"]


def _best(runs) -> dict:
    """Per algorithm: (run, final test accuracy) of the best finished run."""
    best = {}
    for run in runs:
        if not (run.run_dir / "summary.json").is_file():
            continue
        algo = next(a.split("=", 1)[1] for a in run.args if a.startswith("algorithm.name="))
        acc = final_acc(run.run_dir)
        if algo not in best or acc > best[algo][1]:
            best[algo] = (run, acc)
    return best


def _lr(run) -> float:
    return float(load_config(run.args[0], run.args[1:]).algorithm.lr)


def run_experiment(name: str) -> list[str]:
    config, overrides, grid, stage2 = EXPERIMENTS[name]
    spec = {"config": config, "name": name, "root": ROOT, "nproc": 1, "overrides": overrides, "grid": grid}
    runs = expand(spec)
    print(f"== {name}: stage 1, {len(runs)} runs on seed 0", flush=True)
    run_local(runs, 1)
    lr = _lr(_best(runs)[next(iter(_best(runs)))][0])  # the first algorithm's (lbsgd/fedavg) best lr
    stage2_grid = [{**{k: v for k, v in g.items() if k != "seed"}, "algorithm.lr": [lr], "seed": [0]} for g in stage2]
    stage2_runs = expand({**spec, "grid": stage2_grid})
    print(f"== {name}: stage 2 at lr {lr}, {len(stage2_runs)} runs on seed 0", flush=True)
    run_local(stage2_runs, 1)
    best = _best(runs + stage2_runs)
    selected = []
    for algo, (run, acc) in best.items():
        print(f"   best {algo}: {run.name} (seed 0 final test acc {acc:.4f})", flush=True)
        pairs = [a.split("=", 1) for a in run.args[1 + len(overrides):]]
        grid_point = {k: [yaml.safe_load(v)] for k, v in pairs if k.startswith("algorithm.")}
        seeds = expand({**spec, "grid": [{**grid_point, "seed": SEEDS}]})
        run_local(seeds, 1)
        selected += [str(run.run_dir)] + [str(s.run_dir) for s in seeds]
    (Path(ROOT) / name / "selected.json").write_text(json.dumps(selected, indent=1))
    return selected


def report_experiment(name: str, target: float) -> None:
    """Table and plots of the selected runs that finished; runs that diverged are listed."""
    selected = json.loads((Path(ROOT) / name / "selected.json").read_text())
    finished = [d for d in selected if (Path(d) / "summary.json").is_file()]
    for d in sorted(set(selected) - set(finished)):
        rows = read_metrics(d)
        print(f"   {d}: did not finish (diverged at round {rows[-1]['round'] + 1 if rows else 1})", flush=True)
    report(finished, str(Path(ROOT) / name / "report"), target)
    print((Path(ROOT) / name / "report" / "table.md").read_text(), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="+", choices=list(EXPERIMENTS))
    p.add_argument("--report-only", action="store_true", help="only remake the tables and plots")
    args = p.parse_args()
    for exp in args.experiments:
        if not args.report_only:
            run_experiment(exp)
        report_experiment(exp, TARGETS[exp])
    sys.exit(0)
