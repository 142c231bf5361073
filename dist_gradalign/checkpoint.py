"""Checkpoints: the whole state of a run, written atomically by rank 0.

A checkpoint holds the parameters x, the algorithm's server state (momentum), the counters,
the training bytes, every RNG of every rank (python, numpy, torch, CUDA), the config it was made
with and the W&B run id. The client sampler and every client's randomness are pure functions of
(seed, round, client), so the round number is the sampler position.

Files are ``checkpoints/ckpt-<round>.pt`` with a ``.sha256`` beside each: written to a
temporary file, fsynced, renamed, and the folder fsynced, so a crash leaves either the old or the
new checkpoint, never half of one. They load with ``torch.load(weights_only=True)``. A truncated
or corrupted file fails its checksum and is skipped in favour of the previous one.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

NAME = re.compile(r"ckpt-(\d{8})\.pt$")
# Keys that may change when a run is resumed (how long and where it runs, how it is shown).
RESUMABLE_CHANGES = ("run_dir", "train.rounds", "train.progress", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.eval_batch_size", "train.device", "logging")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or belongs to another config."""


def rng_state() -> dict:
    """This process's RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": _python_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict, defaults: Optional[dict] = None) -> list[str]:
    """Keys whose values differ, other than those a resumed run may change. A key the saved
    config lacks (added in a later version) counts as its value in ``defaults``."""
    a, b = {**_flatten(defaults or {}), **_flatten(saved)}, _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} in the checkpoint, {b.get(key)!r} now")
    return diffs


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A binary file that hashes what is written to it (torch.save streams into it)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary file, fsync it, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(folder: Path, state: dict, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``state['round']``; keep the newest ``keep``. The
    state is streamed to disk and hashed on the way (no copy of it in memory: with stateful
    SCAFFOLD it holds every client's control variate)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{state['round']:08d}.pt"
    digest = []

    def write(f):
        out = _HashingFile(f)
        torch.save(state, out)
        digest.append(out.sha.hexdigest())

    try:
        _write_atomic(path, write)
        _write_atomic(path.with_suffix(".pt.sha256"), lambda f: f.write(digest[0].encode()))
        _fsync_dir(folder)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: {e.strerror or e}; "
                              f"the previous checkpoints in {str(folder)!r} are kept") from None
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".pt.sha256").unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.search(p.name))


def load_latest(folder: Path) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that passes its checksum and loads; damaged ones are reported
    (to stderr) and skipped. None when there is none."""
    for path in reversed(list_checkpoints(folder)):
        try:
            digest = path.with_suffix(".pt.sha256").read_text().strip()
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    sha.update(chunk)
            if sha.hexdigest() != digest:
                raise ValueError("checksum mismatch (truncated or corrupted)")
            return path, torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except (OSError, ValueError, RuntimeError, EOFError) as e:
            print(f"warning: skipping checkpoint {str(path)!r}: {e}", file=sys.stderr, flush=True)
    return None
