"""Weights & Biases tracking (``logging.wandb``), on rank 0 only.

The API key comes from the environment (``WANDB_API_KEY``) or ``wandb login``, never from
the config. The run id is kept in ``run_dir/wandb_run_id`` so that a run restarted in the same
directory continues the same W&B run; ``--overwrite`` starts a new one.

Only wandb's public API is used (``wandb.init``, ``Run.log``, ``Run.summary``, ``Run.finish``),
so that any release in the range setup.cfg declares works. W&B never stops training: an
exception from wandb (importing it included) becomes one warning line on stderr and tracking
is off for the rest of the run; metrics.jsonl, checkpoints and summary.json are written as usual.
"""
from __future__ import annotations

import secrets
import string
import sys
from pathlib import Path
from typing import Callable, Optional

from .config import Config

ID_FILE = "wandb_run_id"
NOT_METRICS = ("clients",)  # logged in metrics.jsonl, not as W&B series
ID_CHARS = string.ascii_lowercase + string.digits


def new_run_id(length: int = 8) -> str:
    """A W&B run id as wandb makes them: short, lowercase letters and digits. From ``secrets``,
    so it neither reads nor advances the seeded RNGs that training randomness comes from."""
    return "".join(secrets.choice(ID_CHARS) for _ in range(length))


class WandbTracker:
    def __init__(self, cfg: Config, run_dir: Path, fresh: bool):
        w = cfg.logging.wandb
        id_path = run_dir / ID_FILE
        run_id = None if fresh or not id_path.is_file() else id_path.read_text().strip()
        run_id = run_id or new_run_id()
        id_path.write_text(run_id + "\n")
        self.run = None
        self.run = self._guard("init", _init_run, w, run_dir, run_id, cfg.to_dict())

    def _guard(self, what: str, call: Callable, *args, **kwargs):
        """``call(*args, **kwargs)``; whatever it raises turns tracking off, with one warning line."""
        try:
            return call(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any wandb failure: training goes on without it
            self.run = None
            msg = " ".join(str(e).split())[:500] or "no message"
            print(f"warning: W&B {what} failed ({type(e).__name__}: {msg}); W&B tracking is off for the rest "
                  "of this run (metrics.jsonl and summary.json are still written)", file=sys.stderr, flush=True)
            return None

    def log(self, row: dict) -> None:
        """One metrics row, with ``updates`` as the W&B step (round, comm_rounds, samples are metrics)."""
        if self.run is not None:
            self._guard("log", self.run.log, {k: v for k, v in row.items() if k not in NOT_METRICS},
                        step=row["updates"])

    def finish(self, summary: Optional[dict], exit_code: int = 0) -> None:
        if self.run is not None:
            self._guard("finish", _finish_run, self.run, summary, exit_code)
            self.run = None


def _init_run(w, run_dir: Path, run_id: str, config: dict):
    import wandb  # imported only when enabled: it is slow to import

    return wandb.init(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags) or None, mode=w.mode,
                      dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name, config=config)


def _finish_run(run, summary: Optional[dict], exit_code: int) -> None:
    if summary:
        run.summary.update(summary)
    run.finish(exit_code=exit_code)


def start_tracker(cfg: Config, run_dir: Path, fresh: bool) -> Optional[WandbTracker]:
    w = cfg.logging.wandb
    if not w.enabled or w.mode == "disabled":
        return None
    return WandbTracker(cfg, run_dir, fresh)
