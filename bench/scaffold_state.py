"""Memory of stateful SCAFFOLD's per-client control variates (BENCHMARKS.md, "Stateful SCAFFOLD"):

    python bench/scaffold_state.py [--clients 47,4700] [--worlds 1,2]

For each number of clients and world size, trains cnn_emnist on EMNIST-47 (IID shards, every
client sampled every round, so every c_i exists after round 1; 2 rounds of 2 local steps of 16
samples) with ``control: per_round`` and ``control: stateful`` under torchrun (gloo, CPU), and
reports per rank: the c_i it holds, their bytes, and the process's peak resident memory
(``ru_maxrss``), plus the final checkpoint's size on disk (rank 0 gathers every c_i). The
difference of the peaks (stateful - per_round) is what the state costs a rank.

Results go to ``bench/results/scaffold_state-<host>.json`` and print as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMNIST47 = REPO.parent / "shared" / "data" / "emnist47" / "emnist47.npz"


def worker(clients: int, control: str, run_dir: str) -> None:
    """One run in a torchrun process group; rank 0 prints a JSON line with every rank's numbers."""
    sys.path.insert(0, str(REPO))
    from dist_gradalign.backend import Backend
    from dist_gradalign.config import from_dict
    from dist_gradalign.engine import Trainer

    cfg = from_dict({
        "run_dir": run_dir, "seed": 0,
        "data": {"source": "npz", "root": str(EMNIST47), "normalize": [0.5, 0.5]},
        "model": {"name": "cnn_emnist"},
        "partition": {"scheme": "iid", "num_clients": clients},
        "algorithm": {"name": "scaffold", "lr": 0.05, "local_steps": 2, "local_batch_size": 16,
                      "full_grad_batch": 16, "control": control},
        "train": {"rounds": 2, "clients_per_round": clients, "eval_every": 2, "progress": False, "device": "cpu"},
    })
    be = Backend.from_env("cpu")
    try:
        t = Trainer(cfg, be)
        t.fit()
        table = t.algo.client_state()
        mine = {"rank": be.rank, "rows": len(table),
                "table_mb": sum(v.numel() * v.element_size() for v in table.values()) / 2**20,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        ranks = be.gather_object(mine)
        if be.is_main:
            ckpt = sorted((Path(run_dir) / "checkpoints").glob("*.pt"))[-1]
            print("RESULT " + json.dumps({"clients": clients, "control": control, "world": be.world_size,
                                          "params": t.x.numel(), "checkpoint_mb": ckpt.stat().st_size / 2**20,
                                          "ranks": ranks}), flush=True)
    finally:
        be.shutdown()


def run(clients: int, control: str, world: int, tmp: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, "worker", str(clients), control, str(Path(tmp) / f"{clients}-{control}-{world}")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def table(results: list[dict]) -> str:
    base = {(r["clients"], r["world"]): r for r in results if r["control"] == "per_round"}
    out = ["| clients | ranks | c_i per rank | c_i MB per rank | peak RSS per_round (MB), rank 0 / others | "
           "peak RSS stateful (MB), rank 0 / others | checkpoint, stateful (MB) |",
           "|---:|---:|---:|---:|---:|---:|---:|"]

    def peaks(r):
        ranks = r["ranks"]
        others = max((x["peak_rss_mb"] for x in ranks[1:]), default=None)
        return f"{ranks[0]['peak_rss_mb']:.0f}" + ("" if others is None else f" / {others:.0f}")

    for r in results:
        if r["control"] != "stateful":
            continue
        b = base[(r["clients"], r["world"])]
        out.append(f"| {r['clients']} | {r['world']} | {max(x['rows'] for x in r['ranks'])} | "
                   f"{max(x['table_mb'] for x in r['ranks']):.1f} | {peaks(b)} | {peaks(r)} | {r['checkpoint_mb']:.1f} |")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="47,4700")
    p.add_argument("--worlds", default="1,2")
    args = p.parse_args()
    if not EMNIST47.exists():
        raise SystemExit(f"{EMNIST47} not found: this benchmark trains on the staged EMNIST-47")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in map(int, args.clients.split(",")):
            for world in map(int, args.worlds.split(",")):
                for control in ("per_round", "stateful"):
                    results.append(run(clients, control, world, tmp))
                    print(json.dumps(results[-1]), flush=True)
    out = REPO / "bench" / "results" / f"scaffold_state-{platform.node()}.json"
    key = lambda r: (r["clients"], r["world"], r["control"])  # noqa: E731
    old = {key(r): r for r in json.loads(out.read_text())} if out.is_file() else {}
    old.update({key(r): r for r in results})  # earlier measurements of other cases are kept
    merged = sorted(old.values(), key=key)
    out.write_text(json.dumps(merged, indent=1))
    print(table(merged))


if __name__ == "__main__":
    main()
