"""Misuse that used to go wrong silently or with a traceback: two runs on one run_dir, NaN or
inf in the input data, an optional dependency that is not installed."""
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from dist_gradalign.cli import main
from dist_gradalign.engine import Preempted, RunDirError, Trainer
from dist_gradalign.rundir import LOCK_FILE, lock_run_dir

from util import REPO, base_config, run_dir_rows, write_npz, write_tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}




def _snapshot(run_dir: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


# ------------------------------------------------------------------------ one run per run_dir

def test_second_run_on_a_live_run_dir_stops_at_once_changes_nothing_and_kill_leaves_no_stale_lock(tmp_path, capsys):
    """A real run in a subprocess holds run_dir; it is then stopped (SIGSTOP, still alive, so
    nothing it does can change the directory while the second run is tried). A second real CLI
    run on the same run_dir must exit 2 with one line naming the holder's pid and host, leave
    every file's bytes and mtime as they were, and not hang (the holder would never let go).
    After kill -9 of the holder the same command resumes from its checkpoint: the lock died
    with the process."""
    cfg = write_tiny_config(tmp_path, train={"rounds": 100_000, "checkpoint_every": 1, "keep_checkpoints": 2,
                                  "eval_every": 100_000})
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dist_gradalign", "train", str(cfg)]
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err)
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints").is_dir() or len(run_dir_rows(run_dir)) < 3:
            assert first.poll() is None, (tmp_path / "first.err").read_text()[-2000:]
            assert time.time() < deadline, "the first run made no progress"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGSTOP)
        before = _snapshot(run_dir)
        assert {"config.yaml", "metrics.jsonl", "partition.json", LOCK_FILE} <= {p.name for p in before}

        start = time.time()
        second = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        elapsed = time.time() - start
        assert second.returncode == 2, second.stderr
        line = _one_line(second.stderr)
        assert line.startswith(f"error: run_dir = '{run_dir}' is in use by another run "
                               f"(pid {first.pid} on host {socket.gethostname()}, since "), line
        assert "nothing was changed" in line and "resuming" not in second.stdout
        assert _snapshot(run_dir) == before, "the refused run changed the run directory"
        assert elapsed < 120, f"refused only after {elapsed:.0f}s"  # start-up and data loading, then at once
    finally:
        os.kill(first.pid, signal.SIGKILL)  # kill -9 (also ends a stopped process)
        first.wait(30)

    # the newest checkpoint, or the one before when the kill caught it half written
    rounds = 2 + max(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("ckpt-*.pt"))
    capsys.readouterr()
    assert main(["train", str(cfg), f"train.rounds={rounds}"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert [r["round"] for r in run_dir_rows(run_dir)] == list(range(1, rounds + 1))
    lock_run_dir(run_dir).release()  # free again after the resumed run


def test_lock_names_holder_and_is_released_after_fit_and_on_errors(tmp_path, capsys):
    cfg = write_tiny_config(tmp_path)
    run_dir = tmp_path / "run"
    held = lock_run_dir(run_dir)  # another open file description: conflicts even in this process
    assert main(["train", str(cfg)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}, since " in line
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing written
    held.release()
    assert (run_dir / LOCK_FILE).read_text() == ""  # no holder named any more

    assert main(["train", str(cfg)]) == 0  # released at the end of a run
    lock_run_dir(run_dir).release()
    assert main(["train", str(cfg), "algorithm.lr=0.3"]) == 2  # refused in _prepare: another config
    lock_run_dir(run_dir).release()

    stopped = base_config(tmp_path / "b", train={"rounds": 3})
    t = Trainer(stopped)
    t.stop_requested = True
    with pytest.raises(Preempted):  # an exception out of the round loop
        t.fit()
    lock_run_dir(Path(stopped.run_dir)).release()
    Trainer(stopped).fit()  # and the same run resumes
    assert len(run_dir_rows(stopped.run_dir)) == 3


def test_lock_error_is_a_run_dir_error(tmp_path):
    held = lock_run_dir(tmp_path / "run")
    try:
        with pytest.raises(RunDirError, match="in use by another run"):
            lock_run_dir(tmp_path / "run")
    finally:
        held.release()


# ------------------------------------------------------------------------ NaN / inf in the data

@pytest.mark.parametrize("split, value, name", [("x_train", np.nan, "NaN"), ("x_test", np.inf, "inf")])
def test_non_finite_input_is_a_data_error_not_a_divergence(tmp_path, capsys, split, value, name):
    rng = np.random.default_rng(0)
    xs = {k: rng.normal(size=(40, 8, 8)).astype(np.float32) for k in ("x_train", "x_test")}
    xs[split][17, 3, 4] = value
    path = write_npz(tmp_path / "bad.npz", xs["x_train"], np.arange(40) % 4, xs["x_test"], np.arange(40) % 4)
    code = main(["train", str(write_tiny_config(tmp_path, data={"source": "npz", "root": str(path)}))])
    line = _one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"error: npz data at '{path}': {split} holds non-finite values (1 of 40 samples; "
                           f"the first is sample 17, with {name})"), line
    assert "lower algorithm.lr" not in line and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ missing optional packages

def _without(tmp_path: Path, *hidden: str) -> tuple[list[str], dict]:
    """A Python command and environment from which the packages ``hidden`` are really absent.

    ``python -S`` skips the site module, so this venv's site-packages is not on sys.path; instead
    PYTHONPATH holds the repository and a directory of symlinks to every entry of that
    site-packages except the hidden ones (and their .dist-info). No module is stubbed and nothing
    is patched: the import system searches the path, finds no such package and raises the same
    ModuleNotFoundError that an environment without it raises."""
    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path / "site-packages"
    farm.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(hidden):
            (farm / entry.name).symlink_to(entry)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(REPO), str(farm)])}
    check = subprocess.run([sys.executable, "-S", "-c",
                            "import importlib.util as u, sys; import torch, yaml, dist_gradalign.engine; "
                            f"sys.exit(any(u.find_spec(m) for m in {hidden!r}))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.returncode == 0, f"the environment is not what the test needs: {check.stderr[-2000:]}"
    return [sys.executable, "-S", "-m", "dist_gradalign"], env


def test_missing_scikit_learn_for_digits_is_one_line(tmp_path):
    cmd, env = _without(tmp_path, "sklearn", "scikit_learn")
    (tmp_path / "empty.yaml").write_text("")  # every default: data.source = digits
    proc = subprocess.run([*cmd, "train", "empty.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith("error: data.source = 'digits' needs scikit-learn, which cannot be imported here "
                           "(No module named 'sklearn'): pip install 'dist-gradalign[digits]'"), line
    assert not (tmp_path / "runs").exists()


def test_missing_matplotlib_for_report_is_one_line(tmp_path, capsys):
    assert main(["train", str(write_tiny_config(tmp_path, train={"rounds": 2}))]) == 0
    cmd, env = _without(tmp_path, "matplotlib", "mpl_toolkits", "pylab")
    proc = subprocess.run([*cmd, "report", str(tmp_path / "run"), "--out", str(tmp_path / "report")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith("error: `report` needs the Python package 'matplotlib', which is not installed in "
                           f"this environment ({sys.executable}): pip install matplotlib"), line
