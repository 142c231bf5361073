"""Performance benchmarks (BENCHMARKS.md, "Performance"): ratios measured within one run.

    python bench/perf.py [--device cpu|cuda] [--repeats 7] [--sections ratio,overhead,...]
                         [--data PATH.npz] [--out runs/bench/perf-<device>.json]

Sections (all by default; ``scaling`` runs on CPU only, through torchrun):

- ratio      GradAlign update time / large-batch SGD update time at the same per-rank batch
             (the arithmetic limit is 2.0: two gradient evaluations per update).
- overhead   a FedAvg round through the trainer / the same forward-backward work in a bare
             hand-written single-process loop.
- profile    where that overhead goes: operators and kernels per round, trainer and bare loop,
             and the trainer's top Python functions (cProfile).
- vectorized client throughput, vectorized vs sequential executor, m = 1, 5, 10, 47 clients.
- precision  bf16 autocast vs float32, one GradAlign update (GPU).
- memory     peak memory per rank against the clients a rank holds in a round and against
             partition.num_clients (CUDA: max_memory_allocated; CPU: the process's VmHWM).
- scaling    1 -> 2 -> 4 gloo ranks (strong: a fixed 8 x 64-sample update; weak: 2 x 64 per
             rank), comm flat vs bucketed, and bytes all-reduced per round against the minimum
             (model size x all-reduces).

EMNIST-47 (``../shared/data`` or ``--data``) with the paper's ``cnn_emnist``; ResNet-18 rows use
random CIFAR-shaped data (timing only). Each timing is the median of ``--repeats`` rounds after
a warm-up; the two sides of every ratio are measured alternately so that drift hits both.
Every row carries the machine and the command that reproduces it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dist_gradalign.backend import Backend
from dist_gradalign.config import load_config
from dist_gradalign.engine import Trainer
from dist_gradalign.executor import local_batches

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs/offline/emnist-iid-fedavg.yaml"
SECTIONS = ("ratio", "overhead", "profile", "vectorized", "precision", "memory", "scaling")
DATA = {"path": str(REPO.parent / "shared/data/emnist47/emnist47.npz")}


def overrides(device: str, *extra: str) -> list[str]:
    return [f"data.root={DATA['path']}", "run_dir=/tmp/dga-perf", "train.progress=false",
            f"train.device={device}", "algorithm.weight_decay=0", *extra]


def trainer(device: str, *extra: str) -> Trainer:
    cfg = load_config(BASE, overrides(device, *extra))
    return Trainer(cfg, Backend.from_env(device))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def alternate(a, b, repeats: int, device: str) -> tuple[float, float]:
    """Median seconds of a() and b(), measured alternately after two warm-ups each."""
    for _ in range(2):
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, device))
        tb.append(timed(b, device))
    return statistics.median(ta), statistics.median(tb)


def round_fn(t: Trainer):
    state = {"r": 0}

    def run():
        state["r"] += 1
        t.run_round(state["r"])
    return run


def bare_fedavg(t: Trainer):
    """The same clients, batches and SGD steps as a FedAvg round, hand-written: a plain module,
    autograd, in-place updates, then the weighted average. No trainer, no flat buffers."""
    cfg = t.cfg
    model = type(t.fm.module)(1, 28, 47).to(t.x.device)  # CNNEmnist(in_channels, side, classes)
    params = list(model.parameters())
    shards = [torch.as_tensor(s, device=t.x.device) for s in t.shards_np]
    state = {"r": 0}

    def run():
        state["r"] += 1
        clients = t.round_clients(state["r"])
        sizes = [t.sizes[c] for c in clients]
        avg = [torch.zeros_like(p) for p in params]
        x0 = [p.detach().clone() for p in params]
        for c, n in zip(clients, sizes):
            with torch.no_grad():
                for p, v in zip(params, x0):
                    p.copy_(v)
            for pos in local_batches(cfg.seed, state["r"], c, n, cfg.algorithm.local_steps,
                                     cfg.algorithm.local_batch_size):
                idx = shards[c][pos.to(t.x.device)]
                loss = F.cross_entropy(model(t.data.x[idx]), t.data.y[idx])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(g, alpha=cfg.algorithm.lr)
            with torch.no_grad():
                for a, p in zip(avg, params):
                    a.add_(p, alpha=n / sum(sizes))
        with torch.no_grad():
            for p, a in zip(params, avg):
                p.copy_(a)
    return run


def cifar_like(n: int = 4096) -> str:
    """Random 32x32x3 uint8 images, 10 classes, in an npz (for ResNet-18 timing only)."""
    path = Path(tempfile.gettempdir()) / f"dga-perf-cifar-like-{n}.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y_train=rng.integers(0, 10, n), x_test=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
                 y_test=rng.integers(0, 10, 64))
    return str(path)


# ---------------------------------------------------------------- sections
# The executor is pinned (train.executor: auto would vectorize 8-10 clients on a GPU): the
# sections compare like with like; the overhead section adds the auto executor as its own row.
DC = ["partition.num_clients=8", "train.clients_per_round=8", "algorithm.local_steps=1", "algorithm.lr=0.2",
      "train.executor=sequential"]
FED = ["algorithm.name=fedavg", "algorithm.local_steps=5", "algorithm.local_batch_size=32",
       "train.clients_per_round=10", "algorithm.lr=0.05", "train.executor=sequential"]


def ratio_rows(dev: str, reps: int) -> list[dict]:
    cases = [("cnn_emnist, 8 clients x 64 on one rank", [*DC, "algorithm.local_batch_size=64"]),
             ("cnn_emnist, 1 client x 512 (one shard per rank)",
              ["partition.num_clients=8", "train.clients_per_round=1", "algorithm.local_steps=1",
               "algorithm.local_batch_size=512"])]
    if dev == "cuda":
        cases.append(("resnet18, 1 client x 128, 32x32x3 (one shard per rank)",
                      [f"data.root={cifar_like()}", "data.normalize=[0.5,0.5]", "model.name=resnet18",
                       "partition.num_clients=8", "train.clients_per_round=1", "algorithm.local_steps=1",
                       "algorithm.local_batch_size=128"]))
    rows = []
    for label, extra in cases:
        lb = trainer(dev, *extra, "algorithm.name=lbsgd")
        ga = trainer(dev, *extra, "algorithm.name=gradalign", "algorithm.beta=0.05")
        t_lb, t_ga = alternate(round_fn(lb), round_fn(ga), reps, dev)
        rows.append({"what": "gradalign / lbsgd update time", "config": label, "a_s": t_ga, "b_s": t_lb,
                     "ratio": t_ga / t_lb, "limit": 2.0})
    return rows


def overhead_rows(dev: str, reps: int) -> list[dict]:
    """The trainer's FedAvg round against the bare loop: eager (sequential), with
    ``train.compile`` (the local step as one compiled graph), and with ``train.executor: auto``."""
    rows = []
    for label, extra in (("", ()), (" (train.compile)", ("train.compile=true",)),
                         (" (executor auto)", ("train.executor=auto",))):
        fa, bare = trainer(dev, *FED, *extra), trainer(dev, *FED)
        t_fa, t_bare = alternate(round_fn(fa), bare_fedavg(bare), reps, dev)
        rows.append({"what": f"fedavg round, trainer{label} / bare loop", "config": "cnn_emnist, 10 clients, K=5, "
                     f"batch 32, executor {fa.executor_record['executor']}", "a_s": t_fa, "b_s": t_bare,
                     "ratio": t_fa / t_bare, "limit": 1.0})
    return rows


def profile_rows(dev: str, reps: int) -> list[dict]:
    """Where the trainer's time over the bare loop goes: operators (and on CUDA, kernels)
    launched per FedAvg round, and the trainer's top Python functions by own time."""
    import cProfile
    import io
    import pstats
    from torch.profiler import ProfilerActivity, profile

    fa, bare = trainer(dev, *FED), trainer(dev, *FED)
    counts = {}
    for name, fn in (("trainer", round_fn(fa)), ("bare", bare_fedavg(bare))):
        fn(), fn()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            fn()
            _sync(dev)
        events = prof.events()
        counts[name] = {"ops": sum(1 for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::")),
                        "kernels": sum(1 for e in events if e.device_type.name == "CUDA")}
    pr = cProfile.Profile()
    run = round_fn(fa)
    pr.enable()
    for _ in range(reps):
        run()
    _sync(dev)
    pr.disable()
    text = io.StringIO()
    pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(12)
    print(text.getvalue(), flush=True)
    return [{"what": "operators per fedavg round, trainer / bare", "config": "cnn_emnist, 10 clients, K=5, batch 32",
             "trainer": counts["trainer"], "bare": counts["bare"], "ratio": None, "limit": None,
             "cprofile_top": text.getvalue()}]


def vectorized_rows(dev: str, reps: int) -> list[dict]:
    rows = []
    for model in ("cnn_emnist", "mlp"):
        for m in (1, 5, 10, 47):
            common = [*FED, f"model.name={model}", "model.hidden=[200,200]", f"train.clients_per_round={m}"]
            seq, vec = trainer(dev, *common), trainer(dev, *common, "train.executor=vectorized")
            t_seq, t_vec = alternate(round_fn(seq), round_fn(vec), reps, dev)
            samples = m * 5 * 32
            rows.append({"what": f"vectorized vs sequential, m={m}", "config": f"{model}, K=5, batch 32",
                         "a_s": t_vec, "b_s": t_seq, "ratio": t_seq / t_vec, "limit": None,
                         "samples_per_s_sequential": samples / t_seq, "samples_per_s_vectorized": samples / t_vec})
    return rows


def precision_rows(dev: str, reps: int) -> list[dict]:
    rows = []
    cases = [("cnn_emnist, 1 client x 512", ["algorithm.local_batch_size=512"])]
    if dev == "cuda":
        cases.append(("resnet18, 1 client x 128", [f"data.root={cifar_like()}", "data.normalize=[0.5,0.5]",
                                                    "model.name=resnet18", "algorithm.local_batch_size=128"]))
    for label, extra in cases:
        common = ["partition.num_clients=8", "train.clients_per_round=1", "algorithm.local_steps=1",
                  "algorithm.name=gradalign", "algorithm.beta=0.05", *extra]
        fp32, bf16 = trainer(dev, *common), trainer(dev, *common, "train.precision=bf16")
        t32, t16 = alternate(round_fn(fp32), round_fn(bf16), reps, dev)
        rows.append({"what": "gradalign update, float32 / bf16 autocast", "config": label,
                     "a_s": t32, "b_s": t16, "ratio": t32 / t16, "limit": None})
    return rows


MEMORY_CASES = [(algo, execu, m, nc) for algo in ("fedga",) for execu in ("sequential", "vectorized")
                for m, nc in ((1, 47), (10, 47), (47, 47), (10, 235), (10, 940))]


def memory_child(dev: str, algo: str, executor: str, m: int, num_clients: int) -> dict:
    """Build a trainer, run 3 rounds; report the resident/allocated memory before and the peak."""
    extra = [f"algorithm.name={algo}", "algorithm.local_steps=5", "algorithm.local_batch_size=32",
             "algorithm.full_grad_batch=32", "algorithm.beta=0.05", f"train.executor={executor}",
             f"train.clients_per_round={m}", f"partition.num_clients={num_clients}"]
    t = trainer(dev, *extra)
    if dev == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _proc_status("VmRSS")
    for r in (1, 2, 3):
        t.run_round(r)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else _proc_status("VmHWM")
    return {"before_mib": before / 2**20, "peak_mib": peak / 2**20, "round_mib": (peak - before) / 2**20,
            "params": t.x.numel()}


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_rows(dev: str, reps: int) -> list[dict]:
    """One fresh process per case (peaks only grow within a process)."""
    rows = []
    for algo, executor, m, nc in MEMORY_CASES:
        cmd = [sys.executable, __file__, "--device", dev, "--data", DATA["path"], "--memory-child",
               json.dumps([algo, executor, m, nc])]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"what": "peak memory per rank", "config": f"{algo}, {executor}, m={m} clients/round, "
                     f"num_clients={nc}", **res, "m": m, "num_clients": nc, "executor": executor,
                     "ratio": None, "limit": None})
    return rows


def scaling_rows(dev: str, reps: int, rounds: int = 14) -> list[dict]:
    """Seconds per round from each run's metrics.jsonl (median of the round-to-round
    differences after the first two rounds); bytes per round against the minimum."""
    if dev != "cpu":
        return []
    rows, cases = [], []
    for algo in ("gradalign", "lbsgd"):
        for p in (1, 2, 4):
            cases.append(("strong", algo, p, 8, "bucketed"))
            cases.append(("weak", algo, p, 2 * p, "bucketed"))
        for p in (2, 4):
            cases.append(("strong", algo, p, 8, "flat"))
    for kind, algo, p, clients, comm in cases:
        run_dir = Path(tempfile.mkdtemp(prefix="dga-scaling-"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={p}",
               "-m", "dist_gradalign", "train", str(BASE.relative_to(REPO)),
               *overrides("cpu", f"run_dir={run_dir}", f"algorithm.name={algo}", "algorithm.beta=0.05",
                          "partition.num_clients=47", f"train.clients_per_round={clients}",
                          "algorithm.local_steps=1", "algorithm.local_batch_size=64", f"train.rounds={rounds}",
                          f"train.eval_every={rounds}", "train.checkpoint_every=0", f"train.comm={comm}")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        times = [b["time"] - a["time"] for a, b in zip(metrics[2:-1], metrics[3:-1])]
        per_round = statistics.median(times)
        bytes_round = metrics[1]["bytes"] - metrics[0]["bytes"]
        minimum = 4 * _num_params_cnn_emnist() * (2 if algo == "gradalign" else 1)  # float32 x all-reduces
        rows.append({"what": f"{kind} scaling", "config": f"{algo}, {p} rank(s), {clients} x 64 per update, comm {comm}",
                     "kind": kind, "algorithm": algo, "ranks": p, "clients": clients, "comm": comm,
                     "s_per_round": per_round, "samples_per_s": clients * 64 / per_round,
                     "bytes_per_round": bytes_round, "min_bytes_per_round": minimum,
                     "bytes_over_min": bytes_round / minimum, "ratio": None, "limit": None,
                     "command": " ".join(shlex.quote(c) for c in cmd)})
        print(f"  {rows[-1]['config']}: {per_round:.4f} s/round, {bytes_round} B/round "
              f"({bytes_round / minimum:.5f} x min)", flush=True)
    return rows


def _num_params_cnn_emnist() -> int:
    from dist_gradalign.models import CNNEmnist, num_parameters
    return num_parameters(CNNEmnist(1, 28, 47))


def machine(dev: str) -> str:
    if dev == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument("--data", default=DATA["path"], help="the EMNIST-47 npz (default: ../shared/data)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    DATA["path"] = str(Path(args.data).resolve())
    if not Path(DATA["path"]).is_file():
        sys.exit(f"bench/perf.py: data file {DATA['path']!r} not found: pass --data PATH to the EMNIST-47 npz")
    dev, reps = args.device, args.repeats
    if args.memory_child:
        print(json.dumps(memory_child(dev, *json.loads(args.memory_child))))
        return
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"bench/perf.py: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    command = "python bench/perf.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    Backend.from_env(dev)  # the trainer's thread setting, before the machine is described
    out = {"machine": machine(dev), "torch": torch.__version__, "device": dev, "repeats": reps,
           "command": command, "rows": []}
    fns = {"ratio": ratio_rows, "overhead": overhead_rows, "profile": profile_rows, "vectorized": vectorized_rows,
           "precision": precision_rows, "memory": memory_rows, "scaling": scaling_rows}
    for name in sections:
        if name == "precision" and dev != "cuda":
            print("precision: skipped on CPU (bf16 autocast is a GPU option)", flush=True)
            continue
        t0 = time.perf_counter()
        rows = fns[name](dev, reps)
        for r in rows:
            r.update(section=name, machine=out["machine"], command=f"python bench/perf.py --device {dev} "
                     f"--repeats {reps} --sections {name}")
        out["rows"] += rows
        print(f"[{name}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s]", flush=True)
    print(f"\nmachine: {out['machine']}; median of {reps} rounds")
    print(f"{'measurement':42s} {'config':62s} {'a (s)':>8s} {'b (s)':>8s} {'ratio':>7s}")
    for r in out["rows"]:
        if r.get("ratio") is not None:
            print(f"{r['what']:42s} {r['config']:62s} {r['a_s']:8.4f} {r['b_s']:8.4f} {r['ratio']:7.3f}")
        elif r["section"] == "memory":
            print(f"{r['what']:42s} {r['config']:62s} before {r['before_mib']:8.1f} MiB, peak "
                  f"{r['peak_mib']:8.1f} MiB, rounds +{r['round_mib']:7.1f} MiB")
        elif r["section"] == "profile":
            print(f"{r['what']:42s} {r['config']:62s} trainer {r['trainer']}, bare {r['bare']}")
        elif r["section"] == "scaling":
            print(f"{r['what']:42s} {r['config']:62s} {r['s_per_round']:8.4f} s/round "
                  f"{r['samples_per_s']:8.0f} samples/s  bytes {r['bytes_over_min']:.5f} x min")
    path = Path(args.out or f"runs/bench/perf-{dev}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
