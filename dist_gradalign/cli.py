"""Command line: ``dist-gradalign train CONFIG [key=value ...]`` and ``dist-gradalign summary RUN_DIR ...``.

Under torchrun: ``torchrun --nproc_per_node N -m dist_gradalign train CONFIG ...``.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-gradalign", description="GradAlign, FedGA and baselines on torch.distributed")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run (under torchrun for several ranks)")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.beta=0.05 train.rounds=100")
    t.add_argument("--overwrite", action="store_true", help="replace a finished run in run_dir")
    s = sub.add_parser("summary", help="compare finished runs side by side")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("--target", type=float, default=None,
                   help="test accuracy (0-1) whose first reaching, in updates and comm rounds, is reported")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    from .data import DataError
    from .engine import DivergenceError, RunDirError
    try:
        if args.command == "train":
            from .config import load_config
            from .engine import train
            train(load_config(args.config, args.overrides), overwrite=args.overwrite)
        else:
            from .summary import summarize
            print(summarize(args.run_dirs, args.target))
    except (ConfigError, DataError, RunDirError, DivergenceError, FileNotFoundError) as e:
        if is_main:
            kind = "config error" if isinstance(e, ConfigError) else "error"
            print(f"{kind}: {e}", file=sys.stderr)
        return 1 if isinstance(e, DivergenceError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
