"""Weights & Biases tracking (``logging.wandb``), on rank 0 only.

The API key comes from the environment (``WANDB_API_KEY``) or ``wandb login``, never from
the config. The run id is kept in ``run_dir/wandb_run_id`` so that a run restarted in the same
directory continues the same W&B run; ``--overwrite`` starts a new one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import Config

ID_FILE = "wandb_run_id"
NOT_METRICS = ("clients",)  # logged in metrics.jsonl, not as W&B series


class WandbTracker:
    def __init__(self, cfg: Config, run_dir: Path, fresh: bool):
        import wandb  # imported only when enabled: it is slow to import

        w = cfg.logging.wandb
        id_path = run_dir / ID_FILE
        run_id = None if fresh or not id_path.is_file() else id_path.read_text().strip()
        run_id = run_id or wandb.util.generate_id()
        id_path.write_text(run_id + "\n")
        self.run = wandb.init(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags) or None,
                              mode=w.mode, dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name,
                              config=cfg.to_dict())

    def log(self, row: dict) -> None:
        """One metrics row, with ``updates`` as the W&B step (round, comm_rounds, samples are metrics)."""
        self.run.log({k: v for k, v in row.items() if k not in NOT_METRICS}, step=row["updates"])

    def finish(self, summary: Optional[dict], exit_code: int = 0) -> None:
        if summary:
            self.run.summary.update(summary)
        self.run.finish(exit_code=exit_code)


def start_tracker(cfg: Config, run_dir: Path, fresh: bool) -> Optional[WandbTracker]:
    w = cfg.logging.wandb
    if not w.enabled or w.mode == "disabled":
        return None
    return WandbTracker(cfg, run_dir, fresh)
