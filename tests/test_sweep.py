"""Sweeps: grid expansion, validation up front, local runs through torchrun, runs file for arrays."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_gradalign.config import ConfigError, load_config
from dist_gradalign.sweep import expand, load_sweep, write_runs_file

from util import REPO, run_dir_rows


def _sweep(tmp_path, grid, **extra):
    base = tmp_path / "base.yaml"
    base.write_text("data: {source: digits}\nmodel: {name: mlp, hidden: [8]}\npartition: {num_clients: 4}\n"
                    "algorithm: {name: fedavg, lr: 0.1, local_steps: 1, local_batch_size: 16}\n"
                    "train: {rounds: 2, clients_per_round: 4, eval_every: 1}\n")
    spec = {"config": str(base), "name": "demo", "root": str(tmp_path / "sweeps"), "grid": grid, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_expansion_names_groups_and_union(tmp_path):
    path = _sweep(tmp_path, [{"algorithm.lr": [0.1, 0.2], "seed": [0, 1]},
                             {"algorithm.name": ["fedga"], "algorithm.beta": [0.05], "seed": [0, 1]}],
                  overrides=["train.rounds=3"])
    runs = expand(load_sweep(str(path)))
    assert [r.name for r in runs] == ["lr=0.1,seed=0", "lr=0.1,seed=1", "lr=0.2,seed=0", "lr=0.2,seed=1",
                                      "name=fedga,beta=0.05,seed=0", "name=fedga,beta=0.05,seed=1"]
    assert runs[0].group == runs[1].group == "demo/lr=0.1"  # seeds share a W&B group
    assert len({r.run_dir for r in runs}) == 6  # each run has its own directory
    cfg = load_config(runs[4].args[0], runs[4].args[1:])
    assert cfg.algorithm.name == "fedga" and cfg.algorithm.beta == 0.05 and cfg.seed == 0
    assert cfg.train.rounds == 3 and cfg.logging.wandb.group == "demo/name=fedga,beta=0.05"
    assert cfg.run_dir == str(tmp_path / "sweeps" / "demo" / "name=fedga,beta=0.05,seed=0")


def test_bad_sweeps_fail_before_running(tmp_path):
    with pytest.raises(ConfigError, match="algorithm.beta = -1"):
        expand(load_sweep(str(_sweep(tmp_path, {"algorithm.beta": [0.1, -1]}))))
    with pytest.raises(ConfigError, match="unknown key 'algorithm.bta'"):
        expand(load_sweep(str(_sweep(tmp_path, {"algorithm.bta": [0.1]}))))
    with pytest.raises(ConfigError, match="non-empty lists"):
        load_sweep(str(_sweep(tmp_path, {"seed": 3})))
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: x.yaml\nname: n\ngrids: {}\n")
    with pytest.raises(ConfigError, match="unknown sweep key 'grids'"):
        load_sweep(str(bad))


def test_local_sweep_runs_each_config_and_skips_finished(tmp_path):
    path = _sweep(tmp_path, {"algorithm.lr": [0.1, 0.2]}, nproc=2)
    cmd = [sys.executable, "-m", "dist_gradalign", "sweep", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("lr=0.1", "lr=0.2"):
        run_dir = tmp_path / "sweeps" / "demo" / name
        assert len(run_dir_rows(run_dir)) == 2
        assert load_config(run_dir / "config.yaml").algorithm.lr == float(name[3:])
        assert "2 rank(s)" in proc.stdout
    assert "| lr=0.1 | fedavg |" in proc.stdout  # the summary table
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.stdout.count("finished before, skipped") == 2


def test_runs_file_lines_are_train_arguments(tmp_path):
    runs = expand(load_sweep(str(_sweep(tmp_path, {"seed": [0, 1]}))))
    path = write_runs_file(runs, tmp_path / "runs.txt")
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    args = shlex.split(lines[1])
    assert "--overwrite" not in args  # a requeued array task must resume, not start again
    cfg = load_config(args[0], args[1:])
    assert cfg.seed == 1 and Path(cfg.run_dir).name == "seed=1"


def test_dry_run_lists_runs(tmp_path):
    path = _sweep(tmp_path, {"seed": [0, 1, 2]})
    proc = subprocess.run([sys.executable, "-m", "dist_gradalign", "sweep", str(path), "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("3 runs")
    assert not (tmp_path / "sweeps").exists()


def test_packed_sweep_runs_two_at_once_and_resumes_an_interrupted_run(tmp_path):
    """--per-device 2 on CPU: two runs at a time, each with half the cores and its own log;
    run again, a finished run is skipped and an interrupted one resumes from its checkpoint."""
    import os
    from dist_gradalign import checkpoint
    path = _sweep(tmp_path, {"algorithm.lr": [0.05, 0.1, 0.2]}, overrides=["train.checkpoint_every=1"])
    cmd = [sys.executable, "-m", "dist_gradalign", "sweep", str(path), "--per-device", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    root = tmp_path / "sweeps" / "demo"
    for name in ("lr=0.05", "lr=0.1", "lr=0.2"):
        assert f"{name}: started (OMP_NUM_THREADS={threads}; output in {root / name}.log)" in proc.stdout
        assert f"{name}: finished" in proc.stdout
        assert len(run_dir_rows(root / name)) == 2
        assert "rank(s) ->" in (root / f"{name}.log").read_text()
    # interrupt lr=0.1 after round 1: no summary, the round-2 checkpoint gone
    (root / "lr=0.1" / "summary.json").unlink()
    checkpoint.list_checkpoints(root / "lr=0.1" / "checkpoints")[-1].unlink()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished before, skipped") == 2
    assert "resuming from" in (root / "lr=0.1.log").read_text()
    assert [r["round"] for r in run_dir_rows(root / "lr=0.1")] == [1, 2]


def test_per_device_must_be_positive(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dist_gradalign", "sweep", str(_sweep(tmp_path, {"seed": [0]})),
                           "--per-device", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--per-device = 0 is out of range" in proc.stderr
