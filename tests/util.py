"""Helpers shared by the tests (imported as ``util``; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

import numpy as np
import torch

from dist_gradalign.config import Config, from_dict

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EMNIST47 = SHARED_DATA / "emnist47" / "emnist47.npz"

# Every algorithm with a setting that exercises its own term (server momentum for one of them).
ALGOS = {
    "lbsgd": {"local_steps": 1},
    "fedavg": {"server_momentum": 0.5, "server_lr": 0.8},
    "fedprox": {"mu": 0.1},
    "scaffold": {},
    "feddyn": {"feddyn_alpha": 0.1},
    "fedga": {"beta": 0.1},
    "gradalign": {"local_steps": 1, "beta": 0.1},
}


def base_config(tmp_path: Path, source: str = "digits", root: str | None = None, seed: int = 0,
                **sections) -> Config:
    """A small valid config writing to tmp_path/run; ``sections`` update its sections."""
    d = {
        "seed": seed,
        "run_dir": str(tmp_path / "run"),
        "data": {"source": source, **({"root": root} if root else {})},
        "partition": {"scheme": "iid", "num_clients": 4},
        "model": {"name": "mlp", "hidden": [16]},
        "algorithm": {"name": "fedavg", "lr": 0.1, "local_steps": 2, "local_batch_size": 16},
        "train": {"rounds": 2, "clients_per_round": 4, "eval_every": 1000, "progress": False},
    }
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(d)


def write_npz(path: Path, x_train, y_train, x_test, y_test) -> Path:
    np.savez(path, x_train=np.asarray(x_train), y_train=np.asarray(y_train),
             x_test=np.asarray(x_test), y_test=np.asarray(y_test))
    return path


def load_params(run_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)


def run_dir_rows(run_dir: str) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# A tiny CLI run on the bundled digits (seconds), for tests that drive `dist-gradalign train`.
TINY = {"data": {"source": "digits"}, "model": {"name": "mlp", "hidden": [16]},
        "partition": {"scheme": "iid", "num_clients": 4},
        "algorithm": {"name": "fedavg", "lr": 0.1, "local_steps": 1, "local_batch_size": 16},
        "train": {"rounds": 3, "clients_per_round": 2, "progress": False}}


def write_tiny_config(tmp: Path, **changes) -> Path:
    """TINY with run_dir tmp/run and ``changes`` merged per section, written to tmp/cfg.yaml."""
    cfg = {**TINY, "run_dir": str(tmp / "run")}
    for k, v in changes.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
