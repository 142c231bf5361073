"""Grid sweeps: expand a sweep file into runs, then run them one after another through
torchrun on this machine, or submit them as one SLURM job array.

A sweep file::

    config: configs/offline/emnist-het-fedga.yaml     # the base config
    name: emnist47-het                                 # runs go to <root>/<name>/<run name>
    root: runs/sweeps
    nproc: 1                                           # ranks per run
    overrides: [train.rounds=100]                      # applied to every run
    grid:                                              # a mapping, or a list of mappings (union)
      algorithm.beta: [0.01, 0.05]
      seed: [0, 1, 2]

Each run gets its own run directory and the W&B group ``<name>/<run name without seed>``, so
the seeds of one configuration are grouped. Finished runs (``summary.json`` present) are
skipped and an interrupted run resumes from its checkpoint, so an interrupted sweep is
continued by running it again. ``--per-device N`` runs N runs at once on each GPU (the paper's
models use a few percent of one), or on CPU N runs that split the cores.
"""
from __future__ import annotations

import itertools
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ConfigError, load_config

SWEEP_KEYS = ("config", "name", "root", "nproc", "overrides", "grid")
ARRAY_SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "sweep-array.sbatch"  # in a source checkout


@dataclass
class Run:
    name: str
    group: str
    args: list[str]  # arguments of `dist-gradalign train`
    run_dir: Path


def _format(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def load_sweep(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {path!r} not found")
    spec = yaml.safe_load(p.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path!r} must hold a mapping")
    unknown = [k for k in spec if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"unknown sweep key {unknown[0]!r} in {path!r}; allowed: {', '.join(SWEEP_KEYS)}")
    for key in ("config", "name"):
        if not isinstance(spec.get(key), str):
            raise ConfigError(f"sweep file {path!r}: '{key}' must be given as a string")
    grids = spec.get("grid") or [{}]
    grids = grids if isinstance(grids, list) else [grids]
    for g in grids:
        if not isinstance(g, dict) or not all(isinstance(v, list) and v for v in g.values()):
            raise ConfigError(f"sweep file {path!r}: 'grid' must map dotted keys to non-empty lists "
                              f"(or be a list of such mappings), got {g!r}")
    spec["grid"] = grids
    spec.setdefault("root", "runs/sweeps")
    spec.setdefault("nproc", 1)
    spec.setdefault("overrides", [])
    return spec


def expand(spec: dict) -> list[Run]:
    """All runs of the sweep, each config validated before anything runs."""
    runs, seen = [], set()
    for grid in spec["grid"]:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            pairs = [(k, _format(v)) for k, v in zip(keys, values)]
            name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in pairs) or "base"
            if name in seen:
                continue
            seen.add(name)
            group_parts = [f"{k.split('.')[-1]}={v}" for k, v in pairs if k != "seed"]
            group = "/".join([spec["name"], ",".join(group_parts) or "base"])
            run_dir = Path(spec["root"]) / spec["name"] / name
            overrides = [*spec["overrides"], *(f"{k}={v}" for k, v in pairs),
                         f"run_dir={run_dir}", f"logging.wandb.group={group}", "train.progress=false"]
            load_config(spec["config"], overrides)  # fail now, not in the middle of the sweep
            runs.append(Run(name, group, [spec["config"], *overrides], run_dir))
    return runs


def slots(nproc: int, per_device: int) -> list[dict[str, str]]:
    """The environment of each run that may run at once: on a GPU machine, the GPUs in groups of
    ``nproc`` (one per rank), ``per_device`` runs on each group; on CPU, ``per_device`` runs that
    split the cores between their ranks (``OMP_NUM_THREADS``)."""
    import torch
    gpus = torch.cuda.device_count()
    if gpus >= nproc:
        groups = [",".join(map(str, range(g * nproc, (g + 1) * nproc))) for g in range(gpus // nproc)]
        return [{"CUDA_VISIBLE_DEVICES": group} for group in groups for _ in range(per_device)]
    if gpus:  # fewer GPUs than ranks: the ranks share them, as torchrun would place them
        return [{} for _ in range(per_device)]
    threads = max(1, len(os.sched_getaffinity(0)) // (per_device * nproc))
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(per_device)]


def run_local(runs: list[Run], nproc: int, per_device: int = 1) -> list[Run]:
    """Run each unfinished run through torchrun, ``per_device`` at a time on each GPU (or group
    of ``nproc`` GPUs; on CPU, sharing the cores); returns the failed ones. A run with a
    checkpoint resumes from it; with more than one at a time, each run's output goes to
    ``<run_dir>.log``."""
    todo = []
    for i, run in enumerate(runs, 1):
        if (run.run_dir / "summary.json").is_file():
            print(f"[{i}/{len(runs)}] {run.name}: finished before, skipped", flush=True)
        else:
            todo.append((i, run))
    free: queue.Queue = queue.Queue()
    for env in slots(nproc, per_device):
        free.put(env)
    packed = free.qsize() > 1
    failed, lock = [], threading.Lock()

    def one(i: int, run: Run) -> None:
        env = free.get()
        try:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "dist_gradalign", "train", *run.args]
            full_env = {**os.environ, **env}
            if packed:
                log = run.run_dir.with_name(run.run_dir.name + ".log")
                log.parent.mkdir(parents=True, exist_ok=True)
                print(f"[{i}/{len(runs)}] {run.name}: started ({' '.join(f'{k}={v}' for k, v in env.items())}; "
                      f"output in {log})", flush=True)
                with open(log, "a") as out:
                    rc = subprocess.run(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT).returncode
            else:
                print(f"[{i}/{len(runs)}] {run.name}", flush=True)
                rc = subprocess.run(cmd, env=full_env).returncode
            if rc != 0:
                with lock:
                    failed.append(run)
                print(f"[{i}/{len(runs)}] {run.name}: FAILED", file=sys.stderr, flush=True)
            elif packed:
                print(f"[{i}/{len(runs)}] {run.name}: finished", flush=True)
        finally:
            free.put(env)

    with ThreadPoolExecutor(max_workers=max(1, free.qsize())) as pool:
        for future in [pool.submit(one, i, run) for i, run in todo]:
            future.result()
    return sorted(failed, key=runs.index)


def write_runs_file(runs: list[Run], path: Path) -> Path:
    """One line per run: the shell-quoted arguments of `dist-gradalign train` (for the job array).
    Without ``--overwrite``: a task that Slurm requeues after preemption resumes its checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(shlex.join(r.args) + "\n" for r in runs))
    return path


def submit_slurm(runs: list[Run], spec: dict, sbatch_args: list[str], script: Path = ARRAY_SCRIPT) -> str:
    """Submit the unfinished runs as one job array of ``script``; returns sbatch's answer."""
    if shutil.which("sbatch") is None:
        raise ConfigError("--slurm needs `sbatch` on PATH (run this on a SLURM login node)")
    if not script.is_file():
        raise ConfigError(f"job-array script {str(script)!r} not found: pass --array-script "
                          "(it is slurm/sweep-array.sbatch in the source tree)")
    todo = [r for r in runs if not (r.run_dir / "summary.json").is_file()]
    if not todo:
        return "every run of the sweep has finished; nothing submitted"
    runs_file = write_runs_file(todo, Path(spec["root"]) / spec["name"] / "runs.txt")
    cmd = ["sbatch", f"--array=0-{len(todo) - 1}", f"--job-name={spec['name']}",
           f"--export=ALL,NPROC_PER_NODE={spec['nproc']}", *sbatch_args, str(script), str(runs_file.resolve())]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip()
