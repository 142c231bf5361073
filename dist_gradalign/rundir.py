"""The run directory's lock: one run at a time per ``run_dir``.

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
