"""Side-by-side comparison of finished runs, read from their ``metrics.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: is {str(run_dir)!r} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_reaching(rows: list[dict], target: float, key: str = "updates") -> Optional[int]:
    """The ``key`` counter (updates or comm_rounds) at the first evaluation with test_acc >= target."""
    for row in rows:
        if row.get("test_acc", -1.0) >= target:
            return row[key]
    return None


def summarize(run_dirs: list[str], target: Optional[float] = None) -> str:
    """A Markdown table: one row per run with final/best accuracy and, with a target, the
    updates and communication rounds needed to first reach it."""
    head = ["run", "algorithm", "rounds", "updates", "comm rounds", "final test acc", "best test acc"]
    if target is not None:
        head += [f"updates to {target:.0%}", f"comm rounds to {target:.0%}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in run_dirs:
        rows = read_metrics(d)
        evals = [r for r in rows if "test_acc" in r]
        cfg_path = Path(d) / "config.yaml"
        algo = yaml.safe_load(cfg_path.read_text())["algorithm"]["name"] if cfg_path.is_file() else "?"
        last = rows[-1] if rows else {}
        cells = [Path(d).name, algo, str(last.get("round", 0)), str(last.get("updates", 0)),
                 str(last.get("comm_rounds", 0)),
                 f"{evals[-1]['test_acc']:.4f}" if evals else "-",
                 f"{max(r['test_acc'] for r in evals):.4f}" if evals else "-"]
        if target is not None:
            cells += [str(v) if v is not None else "not reached"
                      for v in (first_reaching(rows, target, "updates"), first_reaching(rows, target, "comm_rounds"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
