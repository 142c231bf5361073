"""The Python entry point: :func:`fit` runs one training job, from a config and, optionally,
the user's own model, data, loss and algorithm (docs/extending.md).

    import dist_gradalign as dg
    result = dg.fit("configs/quickstart/fedga.yaml", model=my_net, data=my_datasets)
    result.summary["test_acc"], result.metrics[-1], result.model

Under ``torchrun --nproc_per_node N my_script.py`` the same script runs on every rank: each
rank calls ``fit`` with the same arguments, the ranks train together, and each gets the same
:class:`Result`. The run directory is the one the CLI writes (``dist-gradalign train`` is a thin
client of this function), so ``summary``, ``report``, sweeps, Slurm and W&B work unchanged.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch.nn as nn

from .backend import Backend
from .config import Config, apply_overrides, from_dict, load_config


@dataclass
class Result:
    """What :func:`fit` returns, the same on every rank."""

    summary: dict  # as summary.json: the last evaluation, counters, time
    metrics: list[dict]  # every row of metrics.jsonl, from round 1 (a resumed run's earlier rows too)
    model: nn.Module  # the trained module: final parameters and buffers (as model.pt holds them)
    run_dir: Path


def fit(config: Union[Config, dict, str, Path, None] = None, *overrides: str, model: Any = None, data: Any = None,
        loss: Any = None, algorithm: Any = None, overwrite: bool = False, resume: str = "auto",
        backend: Optional[Backend] = None) -> Result:
    """Train (or resume) one run and return its :class:`Result`.

    ``config``: a :class:`~dist_gradalign.config.Config`, a dict of the YAML's keys, or the path
    of a YAML file; ``overrides``: dotted ``key=value`` strings applied to it (as on the command
    line). Each part, when given, replaces the config's choice (and ``components.json`` in the
    run directory records what was used):

    - ``model``: an ``nn.Module``, or a factory of one (called as ``model.name``'s factory is);
    - ``data``: a pair ``(train, test)`` of map-style datasets, or a factory returning one;
    - ``loss``: a function ``(output, target) -> per-sample losses``, or a class of such;
    - ``algorithm``: an :class:`~dist_gradalign.algorithms.Algorithm` instance, or a subclass
      (called with the ``algorithm`` config and ``algorithm.kwargs``).

    ``overwrite`` starts again in a used ``run_dir``; ``resume="never"`` refuses to continue one.
    Raises :class:`~dist_gradalign.config.ConfigError` (a bad config or part) before training."""
    from .engine import Trainer

    cfg = _config(config, list(overrides))
    parts = {k: v for k, v in (("model", model), ("data", data), ("loss", loss), ("algorithm", algorithm))
             if v is not None}
    be = backend or Backend.from_env(cfg.train.device, cfg.train.timeout_s)
    try:
        trainer = Trainer(cfg, be, parts)
        summary = trainer.fit(overwrite, resume)
        path = Path(cfg.run_dir) / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if be.is_main else None
        rows = be.broadcast_object(rows)
        trainer.load_global()
        return Result(summary=summary, metrics=rows, model=trainer.fm.module, run_dir=Path(cfg.run_dir))
    finally:
        if backend is None:
            be.shutdown()


def _config(config: Union[Config, dict, str, Path, None], overrides: list[str]) -> Config:
    if isinstance(config, Config):
        return from_dict(apply_overrides(config.to_dict(), overrides)) if overrides else config
    if isinstance(config, dict):
        return from_dict(apply_overrides(copy.deepcopy(config), overrides))
    return load_config(config, overrides)
