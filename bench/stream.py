"""Benchmarks of ``data.storage`` (BENCHMARKS.md, "Streaming data"):

    python bench/stream.py memory      [--sizes 10000,200000] [--data runs/bench/folders]
    python bench/stream.py cap         [--size 200000] [--cap-gb 1.5]
    python bench/stream.py throughput  [--repeats 3] [--models cnn_cifar,resnet18]

- memory      peak memory of a whole training process tree (the rank and its loader workers)
              against the dataset size, memory and stream, on synthetic JPEG image folders
              (32x32 RGB, 10 classes, written once under --data). Peak = the largest sum over
              the tree of each process's PSS (proportional set size: shared pages counted once),
              sampled every 50 ms from /proc/<pid>/smaps_rollup.
- cap         the same training in a memory cgroup (v1 or v2, as root) limited to --cap-gb:
              stream must train to the end; memory must stop with a clear error (exit 2).
- throughput  training samples per second (samples through forward passes / the trainer's
              training time, evaluation excluded, after a warm-up of 1/6 of the rounds) stream /
              memory, with 0, 1, 2 loader workers, for cnn_cifar and ResNet-18 on the 10k folder,
              large-batch SGD with 2 workers x 32 samples per update, one rank; median of
              --repeats runs, the variants alternating.

Results go to ``bench/results/stream/<section>-<host>.json`` and print as markdown tables.
Run throughput on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "stream"


def make_folder(root: Path, n_train: int, n_test: int = 1000, classes: int = 10, size: int = 32) -> Path:
    """train/<c>/*.jpg and test/<c>/*.jpg, noisy images whose colour depends on the class."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
        for i in range(n):
            c = i % classes
            pixels = np.clip(np.array([25 * c, 255 - 25 * c, 128]) + rng.normal(0, 50, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / split / f"c{c}" / f"{i:07d}.jpg", quality=90)
            if i % 20000 == 0:
                print(f"\r{root.name} {split}: {i}/{n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    done.touch()
    return root


def config(root: Path, run_dir: Path, storage: str, model: str = "mlp", algorithm: str = "fedavg",
           rounds: int = 20, workers: int = 2) -> dict:
    hidden = {"hidden": [64]} if model == "mlp" else {}
    d = {"seed": 0, "run_dir": str(run_dir),
         "data": {"source": "imagefolder", "root": str(root), "storage": storage, "workers": workers,
                  "normalize": [0.5, 0.25]},
         "partition": {"scheme": "iid", "num_clients": 10},
         "model": {"name": model, **hidden},
         "algorithm": {"name": algorithm, "lr": 0.05, "local_steps": 5 if algorithm == "fedavg" else 1,
                       "local_batch_size": 32},
         "train": {"rounds": rounds, "clients_per_round": 2, "eval_every": 1000, "checkpoint_every": 0,
                   "progress": False}}
    return d


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Cgroup:
    """A memory cgroup (v1 or v2) under this process's own, with a limit; as root only."""

    def __init__(self, name: str, limit: int):
        line = next(l for l in Path("/proc/self/cgroup").read_text().splitlines()
                    if "memory" in l.split(":")[1].split(",") or l.startswith("0::"))
        v2 = line.startswith("0::")
        base = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
        self.path = base / line.split(":", 2)[2].lstrip("/") / name
        self.path.mkdir(exist_ok=True)
        self.peak_file = "memory.peak" if v2 else "memory.max_usage_in_bytes"
        (self.path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
        if not v2:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        try:
            return int((self.path / self.peak_file).read_text())
        except (OSError, ValueError):
            return 0

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def train(cfg: dict, tag: str, cgroup: Cgroup | None = None) -> dict:
    """One training process (CLI); its tree's peak PSS, exit code, stderr tail and summary."""
    run_dir = Path(cfg["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dist_gradalign", "train", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=cgroup.enter if cgroup else None)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], sum(_pss(p) for p in descendants(proc.pid)))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    summary = run_dir / "summary.json"
    record = run_dir / "data.json"
    return {"tag": tag, "rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 2),
            "peak_pss_mib": round(peak[0] / 2**20, 1),
            "cgroup_peak_mib": round(cgroup.peak() / 2**20, 1) if cgroup else None,
            "summary": json.loads(summary.read_text()) if summary.exists() else None,
            "data": json.loads(record.read_text()) if record.exists() else None,
            "stderr_tail": err.strip().splitlines()[-1:] if err.strip() else []}


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return f"{platform.node()}: {os.cpu_count()} x {cpu}"


def save(section: str, rows: list[dict], args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{section}-{platform.node()}.json"
    path.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"-> {path}", file=sys.stderr)


def section_memory(args) -> list[dict]:
    rows = []
    print("| images (train) | decoded (MiB) | storage | peak PSS, rank + workers (MiB) | exit |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        root = make_folder(args.data / f"jpeg-{n}", n)
        for storage in ("memory", "stream"):
            r = train(config(root, args.runs / f"mem-{n}-{storage}", storage), f"mem-{n}-{storage}")
            r.update(images=n, storage=storage)
            rows.append(r)
            decoded = r["data"]["decoded_bytes_per_rank"] / 2**20 if r["data"] else float("nan")
            print(f"| {n} | {decoded:.0f} | {storage} | {r['peak_pss_mib']:.0f} | {r['rc']} |", flush=True)
    return rows


def section_cap(args) -> list[dict]:
    root = make_folder(args.data / f"jpeg-{args.size}", args.size)
    rows = []
    print(f"| storage | memory cgroup limit | exit | cgroup peak (MiB) | peak PSS (MiB) | message |")
    print("|---|---|---|---|---|---|")
    for storage in ("stream", "memory"):
        cg = Cgroup(f"dga-bench-{storage}", int(args.cap_gb * 2**30))
        try:
            r = train(config(root, args.runs / f"cap-{storage}", storage), f"cap-{storage}", cg)
        finally:
            cg.remove()
        r.update(storage=storage, cap_gb=args.cap_gb, images=args.size)
        rows.append(r)
        msg = (f"trained {r['summary']['round']} rounds, test_acc {r['summary']['test_acc']:.3f}" if r["summary"]
               else " ".join(r["stderr_tail"])[:300])
        print(f"| {storage} | {args.cap_gb} GiB | {r['rc']} | {r['cgroup_peak_mib']:.0f} | {r['peak_pss_mib']:.0f} | "
              f"{msg} |", flush=True)
    return rows


def steady_speed(run_dir: Path) -> float:
    """Samples per second of training time after the first 1/6 of the rounds (the warm-up:
    worker start-up, allocator and caches), from the metrics rows."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    a, b = rows[len(rows) // 6 - 1], rows[-1]
    return (b["samples"] - a["samples"]) / (b["time"] - a["time"])


def section_throughput(args) -> list[dict]:
    root = make_folder(args.data / "jpeg-10000", 10000)
    rows = []
    print("| model | storage | workers | samples/s (median) | runs | stream / memory |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        rounds = {"cnn_cifar": 300, "resnet18": 24}.get(model, 300)
        variants = [("memory", 0), *(("stream", w) for w in args.workers)]
        speeds: dict = {v: [] for v in variants}
        for rep in range(args.repeats):  # alternate the variants so drift hits all of them
            for storage, workers in variants:
                cfg = config(root, args.runs / f"tp-{model}-{storage}-{workers}", storage, model=model,
                             algorithm="lbsgd", rounds=rounds, workers=workers)
                r = train(cfg, f"tp-{model}-{storage}-{workers}")
                assert r["rc"] == 0, r["stderr_tail"]
                speeds[storage, workers].append(steady_speed(Path(cfg["run_dir"])))
        base = statistics.median(speeds["memory", 0])
        for (storage, workers), s in speeds.items():
            med = statistics.median(s)
            rows.append({"model": model, "storage": storage, "workers": workers, "samples_per_s": s,
                         "median": med, "ratio": med / base})
            print(f"| {model} | {storage} | {workers if storage == 'stream' else '-'} | {med:.0f} | "
                  f"{', '.join(f'{v:.0f}' for v in s)} | {med / base:.3f} |", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=["memory", "cap", "throughput"])
    p.add_argument("--sizes", default="10000,200000", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--size", default=200000, type=int)
    p.add_argument("--cap-gb", default=1.5, type=float)
    p.add_argument("--repeats", default=3, type=int)
    p.add_argument("--models", default="cnn_cifar,resnet18", type=lambda s: s.split(","))
    p.add_argument("--workers", default="0,1,2", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--data", default=REPO / "runs" / "bench" / "folders", type=Path)
    p.add_argument("--runs", default=REPO / "runs" / "bench" / "stream", type=Path)
    args = p.parse_args()
    rows = {"memory": section_memory, "cap": section_cap, "throughput": section_throughput}[args.section](args)
    save(args.section, rows, args)


if __name__ == "__main__":
    main()
