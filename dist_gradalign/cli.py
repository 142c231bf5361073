"""Command line: ``dist-gradalign train CONFIG [key=value ...]``, ``summary``, ``report`` and ``sweep``.

Under torchrun: ``torchrun --nproc_per_node N -m dist_gradalign train CONFIG ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError

EXIT_REQUEUE = 75  # checkpointed after SIGTERM/SIGUSR1: requeue the job (slurm/common.sh does)
# pip's name for an importable module that differs from it (a missing one is reported in one line)
PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-gradalign", description="GradAlign, FedGA and baselines on torch.distributed")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run (under torchrun for several ranks)")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.beta=0.05 train.rounds=100")
    t.add_argument("--overwrite", action="store_true", help="start again, replacing the run in run_dir")
    t.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto (default): continue from the newest good checkpoint in run_dir if there is one")
    s = sub.add_parser("summary", help="compare finished runs side by side")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("--target", type=float, default=None,
                   help="test accuracy (0-1) whose first reaching, in updates and comm rounds, is reported")
    w = sub.add_parser("sweep", help="expand a grid into runs: via torchrun (--per-device N at once), or as a SLURM job array")
    w.add_argument("sweep_file")
    w.add_argument("--per-device", type=int, default=1, metavar="N",
                   help="runs at once on each GPU (or group of nproc GPUs); on CPU, N runs sharing the cores")
    w.add_argument("--dry-run", action="store_true", help="list the runs and validate their configs, run nothing")
    w.add_argument("--slurm", action="store_true", help="submit the unfinished runs as one SLURM job array")
    w.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch argument (repeatable)")
    w.add_argument("--array-script", default=None, help="job-array script (default: slurm/sweep-array.sbatch)")
    r = sub.add_parser("report", help="plots (accuracy/loss vs comm rounds and updates, grad variance) and a Table-1 markdown")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--out", default="report", help="output folder (default: report)")
    r.add_argument("--target", type=float, default=None, help="test accuracy (0-1) to report updates-to-target for")
    return p


def _sweep(args: argparse.Namespace) -> int:
    from . import sweep
    spec = sweep.load_sweep(args.sweep_file)
    runs = sweep.expand(spec)
    if args.dry_run:
        for run in runs:
            print(f"{run.name}\t{run.group}\t{run.run_dir}")
        print(f"{len(runs)} runs")
        return 0
    if args.slurm:
        script = Path(args.array_script) if args.array_script else sweep.ARRAY_SCRIPT
        print(sweep.submit_slurm(runs, spec, args.sbatch_arg, script))
        return 0
    if args.per_device < 1:
        raise ConfigError(f"--per-device = {args.per_device} is out of range: must be >= 1")
    failed = sweep.run_local(runs, spec["nproc"], args.per_device)
    from .summary import summarize
    done = [str(r.run_dir) for r in runs if (r.run_dir / "summary.json").is_file()]
    if done:
        print(summarize(done))
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(r.name for r in failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    from .checkpoint import CheckpointError
    from .data import DataError
    from .backend import CommError
    from .engine import DivergenceError, Preempted, RunDirError
    try:
        if args.command == "train":
            from .api import fit
            fit(args.config, *args.overrides, overwrite=args.overwrite, resume=args.resume)
        elif args.command == "sweep":
            return _sweep(args)
        elif args.command == "report":
            from .report import report
            out = report(args.run_dirs, args.out, args.target)
            print("\n".join([*out["plots"], out["table"]]))
        else:
            from .summary import summarize
            print(summarize(args.run_dirs, args.target))
    except Preempted as e:
        if is_main:
            print(f"preempted: {e}", file=sys.stderr)
        return EXIT_REQUEUE
    except CommError as e:  # every rank says what it saw: a peer died, hangs, or the network failed
        print(f"error: a collective operation failed: {e}; a rank died or hangs, or the network failed; "
              "the last checkpoint resumes the run: run the same command (under torchrun --max-restarts "
              "it restarts by itself)", file=sys.stderr)
        return 1
    except DivergenceError as e:
        if is_main or e.local:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, RunDirError, CheckpointError, FileNotFoundError) as e:
        if is_main:
            kind = "config error" if isinstance(e, ConfigError) else "error"
            print(f"{kind}: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional dependency (or one removed by hand) is missing
        top = (e.name or "").partition(".")[0]
        if not top or top == __package__:
            raise
        if is_main:
            print(f"error: `{args.command}` needs the Python package {top!r}, which is not installed in this "
                  f"environment ({sys.executable}): pip install {PIP_NAMES.get(top, top)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
