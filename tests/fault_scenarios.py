"""Rank failures under real torchrun groups (2 gloo ranks on the bundled digits), each checked
to end bit-identically to an unbroken run. tests/test_resume.py runs each scenario once;
run this file to repeat them and see that none fails or hangs:

    python tests/fault_scenarios.py --repeat 20          # sigterm and kill, 20 times each, in turn
    python tests/fault_scenarios.py --repeat 3 --scenarios hang
    python tests/fault_scenarios.py --repeat 20 --scenarios kill --ways plain disable-share
    sudo python tests/fault_scenarios.py --repeat 20 --scenarios kill2 --ways plain disable-share

``--ways``: how torchrun is started. ``plain`` is torchrun as users copy it from the README: its
agent shares its rendezvous store with the ranks, and the ranks keep one attempt's keys from
the next themselves (``dist_gradalign.backend.attempt_store``); ``disable-share`` adds
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a fresh store per attempt from torch itself).
``kill2``: the killed rank on two network-namespace nodes (2 x 2 ranks, slurm/netns-nodes.sh,
root), checked to end bit-identical to an unbroken two-node run.

It prints one line per scenario run and, at the end, the count and the slowest time.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import REPO, load_params, run_dir_rows  # noqa: E402

LAUNCH_ENV = {"OMP_NUM_THREADS": "1"}
WAYS = {"plain": {}, "disable-share": {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}}
TIMEOUT = 120  # seconds for one torchrun: a scenario that has not ended by then is a hang
ROUNDS = 100  # a run's rounds: the scenarios stop it at round 6 or 10


def torchrun(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **LAUNCH_ENV, **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, marker: str, timeout: float = TIMEOUT) -> tuple[str, str]:
    """Wait for a torchrun group. A group still running after ``timeout`` is a failure: its
    agent's process group and every worker whose command line holds ``marker`` are killed (so
    nothing is left holding the pipes) and AssertionError names the hang."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids(marker):
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"torchrun still running after {timeout} s (killed):\n{err[-3000:]}") from None


def is_rank(pid: int) -> bool:
    """PID is a training rank as torchrun starts one (``python -u -m dist_gradalign train CFG``),
    not an agent (``python -m torch.distributed.run``, ``torchrun``), srun or a batch shell."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return argv[1:5] == [b"-u", b"-m", b"dist_gradalign", b"train"]


def pids(marker: str, rank: int | None = None) -> list[int]:
    """Training ranks (:func:`is_rank`) whose command line holds ``marker``, optionally only the
    one with RANK=rank."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and is_rank(int(pid)) and (rank is None or f"RANK={rank}".encode() in environ):
            out.append(int(pid))
    return out


def worker_pid(marker: str, rank: int) -> int:
    found = pids(marker, rank)
    assert found, f"no worker with RANK={rank}"
    return found[0]


def wait_rows(run_dir: Path, n: int, procs, describe=None, timeout: float = 240, poll: float = 0.2) -> None:
    """Wait until ``run_dir`` has ``n`` metrics rows while every process of ``procs`` (one or a
    list) runs; ``describe()`` says what went wrong (default: the first process's stderr)."""
    procs = procs if isinstance(procs, list) else [procs]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            detail = describe() if describe else procs[0].communicate()[1][-2000:]
            raise AssertionError(f"run ended early:\n{detail}")
        try:
            if len(run_dir_rows(run_dir)) >= n:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(poll)
    raise AssertionError("timed out waiting for rounds")


def freeze_at(run_dir: Path, n: int, proc: subprocess.Popen, marker: str) -> dict[int, int]:
    """SIGSTOP both ranks as soon as ``run_dir`` has ``n`` metrics rows, so that what the
    scenario does next lands at a known point of a run that cannot end meanwhile (its rounds take
    milliseconds: a signal sent to a running group can arrive after the last round). Returns
    {rank: pid}; the scenario sends SIGCONT."""
    wait_rows(run_dir, 1, proc)
    ranks = {rank: worker_pid(marker, rank) for rank in (0, 1)}
    wait_rows(run_dir, n, proc, poll=0.005)
    for pid in ranks.values():
        os.kill(pid, signal.SIGSTOP)
    rows = len(run_dir_rows(run_dir))
    assert rows < ROUNDS, f"the run reached round {rows} of {ROUNDS} before it was stopped"
    return ranks


def cli_cfg(root: Path, name: str, **train) -> Path:
    path = root / f"{name}.yaml"
    t = {"rounds": ROUNDS, "clients_per_round": 4, "eval_every": 5, "checkpoint_every": 4, "progress": False, **train}
    path.write_text(f"run_dir: {root / name}\ndata: {{source: digits}}\nmodel: {{name: mlp, hidden: [64]}}\n"
                    "partition: {num_clients: 8}\nalgorithm: {name: fedga, beta: 0.1, local_steps: 4, "
                    f"local_batch_size: 32}}\ntrain: {t}\n".replace("'", ""))
    return path


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical parameters and the same metrics rows (but wall time)."""
    pa, pb = load_params(a), load_params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa), "parameters are not bit-identical"
    strip = lambda d: [{k: v for k, v in r.items() if k != "time"} for r in run_dir_rows(d)]  # noqa: E731
    assert strip(a) == strip(b)


def reference(root: Path) -> Path:
    """The unbroken run every scenario must end equal to."""
    proc = torchrun(["-m", "dist_gradalign", "train", str(cli_cfg(root, "ref"))])
    _, err = finish(proc, "ref.yaml")
    assert proc.returncode == 0, err[-2000:]
    return root / "ref"


def sigterm_one_rank(root: Path, name: str) -> None:
    """SIGTERM to rank 1 alone: every rank checkpoints at the same round boundary and stops;
    the same command resumes to the end."""
    cfg = cli_cfg(root, name)
    proc = torchrun(["-m", "dist_gradalign", "train", str(cfg)])
    ranks = freeze_at(root / name, 6, proc, str(cfg))
    os.kill(ranks[1], signal.SIGTERM)
    for pid in ranks.values():
        os.kill(pid, signal.SIGCONT)
    _, err = finish(proc, str(cfg))
    assert proc.returncode != 0 and "preempted: stopped by a signal after round" in err, err[-2000:]
    stopped_at = len(run_dir_rows(root / name))
    assert 6 <= stopped_at < ROUNDS
    again = torchrun(["-m", "dist_gradalign", "train", str(cfg)])
    out, err = finish(again, str(cfg))
    assert again.returncode == 0, err[-2000:]
    assert f"round {stopped_at})" in out


def kill_one_rank(root: Path, name: str) -> None:
    """SIGKILL to rank 1 under --max-restarts: torchrun restarts the group, which resumes from
    the last checkpoint."""
    cfg = cli_cfg(root, name)
    proc = torchrun(["--max-restarts=3", "-m", "dist_gradalign", "train", str(cfg)])
    ranks = freeze_at(root / name, 10, proc, str(cfg))
    os.kill(ranks[1], signal.SIGKILL)
    os.kill(ranks[0], signal.SIGCONT)
    out, err = finish(proc, str(cfg))
    assert proc.returncode == 0, err[-2000:]
    assert "resuming from" in out


def hang_one_rank(root: Path, name: str) -> None:
    """Rank 1 stops (SIGSTOP: alive, silent): rank 0's collective times out after
    train.timeout_s with a clear message instead of the 30-minute default, and the same command
    resumes from the last checkpoint."""
    cfg = cli_cfg(root, name, timeout_s=5)
    proc = torchrun(["-m", "dist_gradalign", "train", str(cfg)])
    ranks = freeze_at(root / name, 6, proc, str(cfg))
    os.kill(ranks[0], signal.SIGCONT)  # rank 1 stays stopped
    deadline = time.time() + 60
    time.sleep(8)  # past rank 0's 5 s timeout
    os.kill(ranks[1], signal.SIGCONT)  # let it see its peer gone and exit
    _, err = finish(proc, str(cfg))
    assert time.time() < deadline
    assert proc.returncode != 0 and "error: a collective operation failed" in err and "train.timeout_s" in err, \
        err[-3000:]
    again = torchrun(["-m", "dist_gradalign", "train", str(cfg)])
    out, err = finish(again, str(cfg))
    assert again.returncode == 0, err[-2000:]
    assert "resuming from" in out


def kill_one_rank_two_nodes(root: Path, name: str) -> None:
    """SIGKILL to one rank of node 2 (its agent lives) of a 2-node x 2-rank group under
    --max-restarts: the agents restart their ranks in a new rendezvous round (node 1's may do so
    for the membership change without counting a restart) and the group resumes."""
    import test_multinode as mn
    cfg = mn.write_cfg(root, name)
    logs = [root / f"{name}-node1.log", root / f"{name}-node2.log"]
    port = 29500 + int(name.removeprefix("kill2"))  # a rendezvous port of its own per run
    procs = [mn.agent(n, cfg, name, port, logs[n - 1], "--max-restarts", "3") for n in (1, 2)]
    ranks = mn.freeze_ranks(root / name, procs, logs, str(cfg))
    os.kill(ranks[2][1], signal.SIGKILL)
    mn.resume(ranks[1] + ranks[2][:1])
    assert mn.wait(procs, logs, str(cfg)) == [0, 0], mn.tails(logs)
    assert "resuming from" in logs[0].read_text(), mn.tails(logs)


def reference_two_nodes(root: Path) -> Path:
    import test_multinode as mn
    cfg = mn.write_cfg(root, "ref2")
    logs = [root / "ref2-node1.log", root / "ref2-node2.log"]
    procs = [mn.agent(n, cfg, "ref2", 29499, logs[n - 1]) for n in (1, 2)]
    assert mn.wait(procs, logs, str(cfg)) == [0, 0], mn.tails(logs)
    return root / "ref2"


SCENARIOS = {"sigterm": sigterm_one_rank, "kill": kill_one_rank, "hang": hang_one_rank}
TWO_NODE_SCENARIOS = {"kill2": kill_one_rank_two_nodes}  # root and network namespaces


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--scenarios", nargs="+", default=["sigterm", "kill"], choices=[*SCENARIOS, *TWO_NODE_SCENARIOS])
    p.add_argument("--ways", nargs="+", default=["plain"], choices=list(WAYS),
                   help="how torchrun is started: plain (as the README), disable-share "
                        "(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1); each series in turn")
    p.add_argument("--keep-going", action="store_true", help="count failures instead of stopping at the first")
    args = p.parse_args()
    failures = 0
    series = [(w, s) for w in args.ways for s in args.scenarios]
    times: dict[tuple, list[float]] = {k: [] for k in series}
    two_nodes = any(s in TWO_NODE_SCENARIOS for s in args.scenarios)
    if two_nodes:
        import test_multinode as mn
        mn.sh(mn.NETNS, "down")
        up = mn.sh(mn.NETNS, "up", "2", timeout=600)
        if up.returncode != 0:
            print(f"no network-namespace nodes (netns-nodes.sh up exited {up.returncode}): {up.stderr[-500:]}")
            return 2
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for way, s in series:
                LAUNCH_ENV.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
                LAUNCH_ENV.update(WAYS[way])
                if two_nodes:
                    mn.LAUNCH_ENV.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
                    mn.LAUNCH_ENV.update(WAYS[way])
                base = root / f"{way}-{s}"
                base.mkdir()
                ref = (reference_two_nodes if s == "kill2" else reference)(base)
                for i in range(args.repeat):
                    t0 = time.time()
                    name = f"{s}{i}"
                    try:
                        {**SCENARIOS, **TWO_NODE_SCENARIOS}[s](base, name)
                        assert_same_run(ref, base / name)
                    except AssertionError as e:
                        print(f"{way} {s} #{i + 1}: FAILED after {time.time() - t0:.1f} s\n{str(e)[-1500:]}", flush=True)
                        failures += 1
                        if not args.keep_going:
                            return 1
                        continue
                    times[way, s].append(time.time() - t0)
                    print(f"{way} {s} #{i + 1}: ok in {times[way, s][-1]:.1f} s", flush=True)
    finally:
        if two_nodes:
            mn.sh(mn.NETNS, "down")
    for (way, s), ts in times.items():
        if ts:
            print(f"{way} {s}: {len(ts)} of {args.repeat} passed (no retry); slowest {max(ts):.1f} s, "
                  f"median {sorted(ts)[len(ts) // 2]:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
