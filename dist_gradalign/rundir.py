"""The run directory: what rank 0 writes there (:class:`RunDirectory`), and its lock: one run at a
time per ``run_dir``.

Rank 0 holds an exclusive ``fcntl.flock`` on ``run_dir/.lock`` for the whole of ``Trainer.fit``,
taken before anything in the directory is written. The kernel drops the lock when the process
ends, however it ends (a crash, ``kill -9``, a preempted job), so it is never left stale and a
restarted or requeued run resumes as before; a second run started while the first is alive
stops at once, naming the holder written into the file (host, pid, since when).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

LOCK_FILE = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used."""


class RunDirLock:
    """An acquired lock; :meth:`release` (or the process ending) gives it up."""

    def __init__(self, fd: Optional[int]):
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # no holder any more (the file stays: see lock_run_dir)
        except OSError:
            pass
        os.close(self.fd)  # closing the only descriptor releases the flock
        self.fd = None


def lock_run_dir(run_dir: Path) -> RunDirLock:
    """Create ``run_dir`` if needed and lock it for this process, or raise :class:`RunDirError`
    naming the holder when another live process holds it. Nothing else in the directory is touched.

    The lock file is never deleted: unlinking it would let a third process lock a new file while
    a second still holds the old one. Where the filesystem does not support ``flock`` the run goes
    on unlocked, with a warning."""
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inheritable (PEP 446)
    except OSError as e:
        raise RunDirError(f"run_dir = {str(run_dir)!r} is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            print(f"warning: cannot lock {path} ({e.strerror or e}: the filesystem may not support flock); "
                  "a second run started on this run_dir would not be stopped", file=sys.stderr, flush=True)
            return RunDirLock(None)
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirError(f"run_dir = {str(run_dir)!r} is in use by another run ({holder}); wait for it to end or "
                          "stop it, or choose another run_dir (nothing was changed in it)") from None
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:
        pass  # who holds it is a courtesy for the next run's message; the lock itself holds
    return RunDirLock(fd)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode() or "null")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "a process that has just started; its pid and host are not written yet"


class RunDirectory:
    """Everything rank 0 writes into ``run_dir`` (the trainer calls it on rank 0 only):
    the lock, the records of how the run was composed, ``metrics.jsonl``, checkpoints, and the
    final ``model.pt`` and ``summary.json``. Nothing already written is lost on a failure."""

    def __init__(self, path: Path):
        self.path, self.checkpoints = path, path / "checkpoints"
        self.lock: Optional[RunDirLock] = None
        self.metrics = None

    def open(self, cfg, overwrite: bool, resume: str, records: dict[str, str]) -> Optional[dict]:
        """Lock the directory, make it ready (``overwrite``: the old run's outputs removed), and
        write ``config.yaml`` and ``records`` (file name -> text). Returns the newest good
        checkpoint's state to resume from (``resume: auto``), or None; refuses a checkpoint made
        with another config, and a finished or unresumable run without ``overwrite``."""
        from . import checkpoint
        from .config import Config, dump_config

        self.lock = lock_run_dir(self.path)  # before anything in run_dir is written
        _check_writable(self.path)
        metrics = self.path / "metrics.jsonl"
        if overwrite:
            for name in ("metrics.jsonl", "summary.json", "model.pt"):
                (self.path / name).unlink(missing_ok=True)
            for old in checkpoint.list_checkpoints(self.checkpoints):
                old.unlink()
                old.with_suffix(".pt.sha256").unlink(missing_ok=True)
        latest = None if overwrite or resume == "never" else checkpoint.load_latest(self.checkpoints)
        if latest:
            path, state = latest
            diffs = checkpoint.config_differences(state["config"], cfg.to_dict(), Config().to_dict())
            if diffs:
                raise checkpoint.CheckpointError(
                    f"checkpoint {str(path)!r} was made with another config ({'; '.join(diffs)}): resume with "
                    "the original config, or choose another run_dir, or pass --overwrite to start again")
            saved = state["config"]
            if saved.get("algorithm", {}).get("lr_schedule") == "cosine" and saved["train"]["rounds"] != cfg.train.rounds:
                raise checkpoint.CheckpointError(
                    f"checkpoint {str(path)!r} belongs to a cosine schedule over train.rounds = "
                    f"{saved['train']['rounds']}: {cfg.train.rounds} rounds would change the step size of the rounds "
                    "already run; resume with the original train.rounds, or pass --overwrite to start again")
            _truncate_metrics(metrics, state["round"])
            print(f"resuming from {path} (round {state['round']})", flush=True)
        elif metrics.exists():
            if resume == "never" or (self.path / "summary.json").exists():
                raise RunDirError(f"run_dir = {str(self.path)!r} already holds a run (metrics.jsonl) and no usable "
                                  "checkpoint to resume from; choose another run_dir or pass --overwrite")
            print(f"warning: {self.path} holds an unfinished run without a usable checkpoint; "
                  "starting again from round 1", file=sys.stderr, flush=True)
            metrics.unlink()
        (self.path / "config.yaml").write_text(dump_config(cfg))
        for name, text in records.items():
            (self.path / name).write_text(text)
        return latest[1] if latest else None

    def finished(self) -> bool:
        return (self.path / "model.pt").is_file() and (self.path / "summary.json").is_file()

    def start_metrics(self) -> None:
        self.metrics = open(self.path / "metrics.jsonl", "a")

    def append(self, row: dict) -> None:
        """One row of ``metrics.jsonl``, flushed."""
        try:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        except OSError as e:
            raise RunDirError(f"cannot write {self.metrics.name!r}: {e.strerror or e}; the rows and checkpoints "
                              "written before are kept: free space and run the same command to resume") from None

    def save_checkpoint(self, state: dict, keep: int) -> Path:
        from . import checkpoint

        return checkpoint.save(self.checkpoints, state, keep)

    def write_final(self, state_dict: dict, summary: dict) -> None:
        """The final ``model.pt`` (parameters and buffers) and ``summary.json``."""
        import torch

        torch.save(state_dict, self.path / "model.pt")
        (self.path / "summary.json").write_text(json.dumps(summary, indent=1))

    def close(self) -> None:
        """Close ``metrics.jsonl`` and release the lock (also when the run failed)."""
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if self.lock:
            self.lock.release()
            self.lock = None


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Drop the rows after the checkpoint's round: the resumed run writes them again."""
    if not path.is_file():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["round"] <= last_round]
    path.write_text("".join(l + "\n" for l in keep))


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"run_dir = {str(run_dir)!r} is not writable: {e.strerror or e}") from None
