"""Two nodes for real, on one machine: torchrun --nnodes 2 and sbatch --nodes 2 across two
Linux network namespaces (slurm/netns-nodes.sh: node I is the namespace dga-node<I> at
10.77.0.<I> on interface dga0, with its own hostname and /etc/hosts).

Every run is 4 gloo ranks (2 nodes x 2) on the bundled digits and must end equal to the
single-node 4-rank run of the same config (parameters within atol 1e-5, the same metrics
counters): world-size invariance across nodes, through failures too:

- ranks of node 2 killed, its torchrun agent alive: with --max-restarts both agents restart
  their ranks, which resume from the last checkpoint;
- the whole node 2 killed (agent and ranks): the agent on node 1 restarts its ranks and waits
  in a new rendezvous round for a second node, for the rendezvous join_timeout (600 s by
  default); a replacement agent started on node 2 with the same endpoint and id joins and the
  job resumes from the last checkpoint. Without one, node 1's agent exits with
  RendezvousTimeoutError when join_timeout runs out, and a rerun resumes;
- under Slurm the whole node 2's torchrun killed ends the job at once (srun
  --kill-on-bad-exit), --max-restarts notwithstanding; resubmitting resumes.

Needs root and `ip` (iproute2; slurm/netns-nodes.sh installs it with apt when missing); the
module skips saying why where network namespaces cannot be made. The Slurm tests also bring
up a two-node cluster (`slurm/local-cluster.sh up --nodes 2`, which installs Slurm like
tests/test_slurm.py) or skip saying why. Nothing leaves the namespaces and their loopbacks;
the namespaces, their links and every process in them are removed at the end, and whatever
a crashed earlier run left is removed at the start.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

import fault_scenarios
from util import REPO, load_params, run_dir_rows

NETNS = REPO / "slurm" / "netns-nodes.sh"
CLUSTER = REPO / "slurm" / "local-cluster.sh"
NET = os.environ.get("DGA_NETNS_NET", "10.77.0")  # node I is NET.I (slurm/netns-nodes.sh)
RDZV_HOST = f"{NET}.1"  # node 1
IFACE = "dga0"  # the nodes' interface (the same name on both)
LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": IFACE,
              "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
TIMEOUT = 180  # seconds for one run (startup of 4 ranks on a busy 2-core machine included)
ROUNDS = 200
SPEC = {
    "data": {"source": "digits"},
    "model": {"name": "mlp", "hidden": [16]},
    "partition": {"scheme": "iid", "num_clients": 8},
    "algorithm": {"name": "fedga", "lr": 0.1, "beta": 0.1, "local_steps": 2, "local_batch_size": 16},
    "train": {"rounds": ROUNDS, "clients_per_round": 8, "eval_every": 10, "checkpoint_every": 10,
              "progress": False},
}
KILL_AT = 40  # rows in metrics.jsonl before a node is killed (checkpoints every 10 rounds)


def sh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def nodes():
    """Two fresh network-namespace nodes; everything on them removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    sh(NETNS, "down")  # what a crashed earlier run left (namespaces, their processes)
    proc = sh(NETNS, "up", "2", timeout=600)
    why = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode in (2, 3, 5):  # not root / no iproute2 / no namespaces here
        pytest.skip(f"no network namespaces here (netns-nodes.sh up exited {proc.returncode}): "
                    f"{why[-1] if why else ''}")
    assert proc.returncode == 0, "\n".join(why[-30:])
    yield
    proc = sh(NETNS, "down")
    assert proc.returncode == 0, proc.stderr


def on_node(node: int, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """CMD on node 1 or 2 (slurm/netns-nodes.sh exec), output to LOG, in a session of its own."""
    full = {**os.environ, **LAUNCH_ENV, **(env or {})}
    with open(log, "ab") as out:
        return subprocess.Popen(["bash", str(NETNS), "exec", str(node), *cmd], cwd=REPO, env=full, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def agent(node: int, cfg: Path, rdzv_id: str, port: int, log: Path, *extra: str) -> subprocess.Popen:
    """One torchrun agent of a 2-node x 2-rank job, on NODE."""
    return on_node(node, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                          "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{RDZV_HOST}:{port}", "--rdzv_id", rdzv_id,
                          *extra, "-m", "dist_gradalign", "train", str(cfg)], log)


def node_pids(node: int, marker: str) -> list[int]:
    """Processes on NODE whose command line holds MARKER (a torchrun agent and its ranks)."""
    proc = subprocess.run(["ip", "netns", "pids", f"dga-node{node}"], capture_output=True, text=True)
    out = []
    for pid in proc.stdout.split():
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                out.append(int(pid))
        except OSError:
            pass
    return out


def kill_node(node: int, marker: str, ranks_only: bool = False) -> list[int]:
    """SIGKILL to the job's processes on NODE: its agent and ranks, or the ranks alone."""
    pids = [p for p in node_pids(node, marker)
            if not (ranks_only and b"torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_bytes())]
    assert pids, f"nothing of {marker} runs on node {node}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def wait(procs: list[subprocess.Popen], logs: list[Path], marker: str, timeout: float = TIMEOUT) -> list[int]:
    """Exit codes of PROCS; a hang is a failure (everything of MARKER on both nodes is killed)."""
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    except subprocess.TimeoutExpired:
        for node in (1, 2):
            for pid in node_pids(node, marker):
                os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s (killed):\n" + tails(logs)) from None


def tails(logs: list[Path], n: int = 3000) -> str:
    return "\n".join(f"----- {log.name}\n{log.read_text(errors='replace')[-n:]}" for log in logs if log.exists())


def freeze_ranks(run_dir: Path, procs: list[subprocess.Popen], logs: list[Path], marker: str) -> dict[int, list[int]]:
    """SIGSTOP every rank on both nodes as soon as ``run_dir`` has KILL_AT metrics rows, so the
    failure a test injects next lands at a known round of a run that cannot end meanwhile.
    Returns {node: rank pids}; the test sends SIGCONT to the survivors."""
    fault_scenarios.wait_rows(run_dir, 1, procs, lambda: tails(logs), TIMEOUT)
    ranks = {node: [p for p in node_pids(node, marker) if fault_scenarios.is_rank(p)] for node in (1, 2)}
    assert len(ranks[1]) == len(ranks[2]) == 2, ranks
    fault_scenarios.wait_rows(run_dir, KILL_AT, procs, lambda: tails(logs), TIMEOUT, poll=0.005)
    for pid in ranks[1] + ranks[2]:
        os.kill(pid, signal.SIGSTOP)
    rows = len(run_dir_rows(run_dir))
    assert rows < ROUNDS, f"the run reached round {rows} of {ROUNDS} before it was stopped"
    return ranks


def resume(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


def write_cfg(root: Path, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "run_dir": str(root / name)}))
    return path


def assert_equivalent(ref: Path, run: Path) -> None:
    """World-size invariance: the parameters within atol 1e-5, the same counters per round."""
    a, b = load_params(ref), load_params(run)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=f"{key}")
    rows_a, rows_b = run_dir_rows(ref), run_dir_rows(run)
    assert len(rows_a) == len(rows_b) == ROUNDS
    for x, y in zip(rows_a, rows_b):
        for key in ("round", "comm_rounds", "updates", "samples", "bytes", "clients"):
            assert x[key] == y[key], (x["round"], key)
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
        if "test_acc" in x:
            assert y["test_acc"] == pytest.approx(x["test_acc"], abs=1e-3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The single-node run every two-node run must equal: torchrun --standalone, 4 ranks."""
    root = tmp_path_factory.mktemp("ref")
    cfg = write_cfg(root, "ref")
    env = {**os.environ, **LAUNCH_ENV}
    del env["GLOO_SOCKET_IFNAME"]  # this machine's own network: gloo picks its interface
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                           "-m", "dist_gradalign", "train", str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 rank(s)" in proc.stdout
    return root / "ref"


def test_netns_script_parses():
    """bash -n slurm/netns-nodes.sh (needs no root)."""
    proc = subprocess.run(["bash", "-n", str(NETNS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------
# torchrun --nnodes 2, one agent per node


def test_nodes_are_separate_hosts(nodes):
    """Each node has its own hostname, address and /etc/hosts; node 1 reaches node 2 over dga0."""
    for node in (1, 2):
        proc = subprocess.run(["bash", str(NETNS), "exec", str(node), "sh", "-c",
                               f"hostname; getent hosts dga-node1 dga-node2; ip -4 -o addr show dev {IFACE}"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == f"dga-node{node}"
        assert f"{NET}.1 " in lines[1] and f"{NET}.2 " in lines[2]
        assert f"{NET}.{node}/24" in proc.stdout
    # node 1 -> node 2: a TCP connect to a closed port is refused (reachable), not 'no route'
    proc = subprocess.run(["bash", str(NETNS), "exec", "1", sys.executable, "-c",
                           f"import socket\ntry: socket.create_connection(('{NET}.2', 9), 5)\n"
                           "except ConnectionRefusedError: print('refused')"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "refused", proc.stdout + proc.stderr


def test_torchrun_two_nodes_equals_one_node(nodes, reference, tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 2 with a c10d rendezvous on node 1: 4 ranks on two
    hosts end as the 4 ranks on one host."""
    cfg = write_cfg(tmp_path, "run")
    logs = [tmp_path / "node1.log", tmp_path / "node2.log"]
    procs = [agent(n, cfg, "two", 29410, logs[n - 1]) for n in (1, 2)]
    assert wait(procs, logs, str(cfg)) == [0, 0], tails(logs)
    out = logs[0].read_text()
    assert f"fedga: {ROUNDS} rounds" in out and "4 rank(s)" in out, tails(logs)
    assert_equivalent(reference, tmp_path / "run")


def test_torchrun_ranks_of_one_node_die_both_nodes_restart(nodes, reference, tmp_path):
    """SIGKILL to node 2's ranks (its agent lives) under --max-restarts: node 1's ranks fail on
    the next collective, both agents restart their ranks in a new rendezvous round, and the
    group resumes from the last checkpoint to the unbroken run's end."""
    cfg = write_cfg(tmp_path, "run")
    logs = [tmp_path / "node1.log", tmp_path / "node2.log"]
    procs = [agent(n, cfg, "ranks", 29411, logs[n - 1], "--max-restarts", "2") for n in (1, 2)]
    ranks = freeze_ranks(tmp_path / "run", procs, logs, str(cfg))
    assert len(kill_node(2, str(cfg), ranks_only=True)) == 2
    resume(ranks[1])
    assert wait(procs, logs, str(cfg)) == [0, 0], tails(logs)
    assert "resuming from" in logs[0].read_text(), tails(logs)
    assert_equivalent(reference, tmp_path / "run")


def test_torchrun_whole_node_dies_replacement_agent_resumes(nodes, reference, tmp_path):
    """SIGKILL to node 2's agent and ranks under --max-restarts: node 1's agent restarts its
    ranks and waits for a second node (it does not go on alone: --nnodes 2); a new agent on
    node 2 with the same rendezvous endpoint and id joins, and the job resumes from the last
    checkpoint to the unbroken run's end.

    The agents run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torchrun's shared store (torch
    2.14.1) a replacement agent fails in the agents' own rendezvous (as its logs and torch's
    dynamic_rendezvous.py read: node 1's agent, rank 0 of the
    rendezvous, keeps its bootstrap store info and does not publish it in the new round: the new
    agent's ``RendezvousStoreInfo.build`` gets "Failed to recv" and node 1 times out on the role
    keys), before any rank starts; the ranks' own store (backend.attempt_store) cannot help there."""
    cfg = write_cfg(tmp_path, "run")
    logs = [tmp_path / "node1.log", tmp_path / "node2.log", tmp_path / "node2-replacement.log"]
    LAUNCH_ENV["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        _replace_a_whole_node(cfg, logs, reference, tmp_path)
    finally:
        del LAUNCH_ENV["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]


def _replace_a_whole_node(cfg: Path, logs: list[Path], reference: Path, tmp_path: Path) -> None:
    procs = [agent(n, cfg, "node", 29412, logs[n - 1], "--max-restarts", "2") for n in (1, 2)]
    ranks = freeze_ranks(tmp_path / "run", procs, logs, str(cfg))
    assert len(kill_node(2, str(cfg))) == 3  # the agent and its 2 ranks
    resume(ranks[1])
    assert procs[1].wait(timeout=30) != 0
    stopped_at = len(run_dir_rows(tmp_path / "run"))
    time.sleep(10)
    assert procs[0].poll() is None, "node 1's agent did not wait for a second node:\n" + tails(logs)
    assert len(node_pids(1, str(cfg))) == 1, "node 1's ranks still run without node 2"
    assert len(run_dir_rows(tmp_path / "run")) == stopped_at  # no progress with one node
    replacement = agent(2, cfg, "node", 29412, logs[2], "--max-restarts", "2")
    assert wait([procs[0], replacement], logs, str(cfg)) == [0, 0], tails(logs)
    out = logs[0].read_text()
    assert "resuming from" in out, tails(logs)
    assert_equivalent(reference, tmp_path / "run")


def test_torchrun_whole_node_dies_survivor_exits_after_join_timeout(nodes, reference, tmp_path):
    """The same without a replacement: node 1's agent gives up when the rendezvous join_timeout
    (here --rdzv_conf join_timeout=20; 600 s by default) runs out, with RendezvousTimeoutError
    and exit status 1; running both agents again resumes from the last checkpoint."""
    join_timeout = 20
    cfg = write_cfg(tmp_path, "run")
    logs = [tmp_path / "node1.log", tmp_path / "node2.log"]
    extra = ("--max-restarts", "2", "--rdzv_conf", f"join_timeout={join_timeout}")
    procs = [agent(n, cfg, "alone", 29413, logs[n - 1], *extra) for n in (1, 2)]
    ranks = freeze_ranks(tmp_path / "run", procs, logs, str(cfg))
    kill_node(2, str(cfg))
    resume(ranks[1])
    t0 = time.time()
    assert wait(procs[:1], logs, str(cfg), timeout=join_timeout + 60) == [1], tails(logs)
    took = time.time() - t0
    assert join_timeout - 1 <= took <= join_timeout + 60, took
    assert "RendezvousTimeoutError" in logs[0].read_text(), tails(logs)
    stopped_at = len(run_dir_rows(tmp_path / "run"))
    assert KILL_AT <= stopped_at < ROUNDS
    again = [tmp_path / "again1.log", tmp_path / "again2.log"]
    procs = [agent(n, cfg, "alone-again", 29414, again[n - 1]) for n in (1, 2)]
    assert wait(procs, again, str(cfg)) == [0, 0], tails(again)
    assert "resuming from" in again[0].read_text(), tails(again)
    assert_equivalent(reference, tmp_path / "run")


# ----------------------------------------------------------------------------------------
# sbatch --nodes 2 on a two-node Slurm (one slurmctld on node 1, one slurmd per node)


@pytest.fixture(scope="module")
def cluster(nodes):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    try:
        proc = sh(CLUSTER, "up", "--nodes", "2", timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.fail("slurm/local-cluster.sh up --nodes 2 did not finish in 1200 s")
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    # 2: not root, 3: slurm-wlm/munge not installable, 5: no network namespaces
    if proc.returncode in (2, 3, 5):
        pytest.skip(f"no two-node Slurm cluster (local-cluster.sh up --nodes 2 exited {proc.returncode}): "
                    f"{tail[-1] if tail else ''}")
    assert proc.returncode == 0, "slurm/local-cluster.sh up --nodes 2 failed:\n" + "\n".join(tail[-40:])
    yield
    sh(CLUSTER, "down", "--nodes", "2")


def slurm_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **LAUNCH_ENV, "NPROC_PER_NODE": "2"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "DGA_TORCHRUN_ARGS", "DGA_SRUN_ARGS", "DIST_GRADALIGN_VENV"):
        env.pop(key, None)
    env.update(extra)
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        env["DIST_GRADALIGN_VENV"] = sys.prefix
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def sbatch(tmp_path: Path, name: str, cfg: Path, env: dict, wait_: bool) -> subprocess.Popen:
    """sbatch --nodes 2 slurm/train.sbatch CFG, submitted on node 1 (the Slurm commands of the
    two-node cluster run on its nodes)."""
    cmd = ["bash", str(NETNS), "exec", "1", "sbatch", *(["--wait"] if wait_ else []), "--parsable",
           f"--job-name={name}", "--time=10", "--nodes=2", str(REPO / "slurm" / "train.sbatch"), str(cfg)]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_job(proc: subprocess.Popen, name: str) -> tuple[int, str]:
    """(exit code, job id) of an sbatch --wait; the job is cancelled if it overruns."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(NETNS), "exec", "1", "scancel", f"--name={name}"], capture_output=True)
        proc.kill()
        pytest.fail(f"job {name} did not finish in {TIMEOUT} s (cancelled)")
    job = out.strip().split(";")[0]
    assert job.isdigit(), f"sbatch printed no job id: {out!r} {err!r}"
    return proc.returncode, job


def test_train_sbatch_two_nodes_equals_one_node(cluster, reference, tmp_path):
    """sbatch --nodes 2 slurm/train.sbatch (NPROC_PER_NODE=2): srun starts one torchrun per node,
    they meet at a c10d rendezvous on the first node, and the 4 ranks end as on one host."""
    cfg = write_cfg(tmp_path, "run")
    slurmd2_log = Path("/var/log/slurm/netns-slurmd-dga-node2.log")
    seen = slurmd2_log.stat().st_size if slurmd2_log.exists() else 0
    name = f"dga-test-2nodes-{uuid.uuid4().hex[:8]}"
    rc, job = finish_job(sbatch(tmp_path, name, cfg, slurm_env(), wait_=True), name)
    out = (tmp_path / f"slurm-{name}-{job}.out").read_text()
    assert rc == 0, out[-3000:]
    assert "2 node(s) [dga-node[1-2]] x 2 rank(s), rendezvous dga-node1:" in out, out[-3000:]
    assert f"fedga: {ROUNDS} rounds" in out and "4 rank(s)" in out, out[-3000:]
    with open(slurmd2_log, "rb") as f:  # node 2's slurmd launched its part of the step
        f.seek(seen)
        assert f"launch task StepId={job}.0 ".encode() in f.read()
    assert_equivalent(reference, tmp_path / "run")


def test_train_sbatch_node_death_ends_job_and_resubmit_resumes(cluster, reference, tmp_path):
    """Node 2's torchrun agent and ranks killed in a Slurm job: srun --kill-on-bad-exit ends the
    whole step at once (even with DGA_TORCHRUN_ARGS=--max-restarts: the agent that would rejoin
    is gone) and the job fails; submitting it again resumes from the last checkpoint."""
    cfg = write_cfg(tmp_path, "run")
    env = slurm_env(DGA_TORCHRUN_ARGS="--max-restarts 2")
    name = f"dga-test-nodedeath-{uuid.uuid4().hex[:8]}"
    proc = sbatch(tmp_path, name, cfg, env, wait_=True)
    ranks = freeze_ranks(tmp_path / "run", [proc], [], str(cfg))
    kill_node(2, str(cfg))
    resume(ranks[1])
    t0 = time.time()
    rc, job = finish_job(proc, name)
    assert time.time() - t0 < 60
    out = (tmp_path / f"slurm-{name}-{job}.out").read_text()
    assert rc != 0, out[-3000:]
    assert "srun: error: dga-node2: task 1: Killed" in out, out[-3000:]
    stopped_at = len(run_dir_rows(tmp_path / "run"))
    assert KILL_AT <= stopped_at < ROUNDS
    name2 = f"dga-test-resubmit-{uuid.uuid4().hex[:8]}"
    rc, job = finish_job(sbatch(tmp_path, name2, cfg, env, wait_=True), name2)
    out = (tmp_path / f"slurm-{name2}-{job}.out").read_text()
    assert rc == 0, out[-3000:]
    assert "resuming from" in out, out[-3000:]
    assert_equivalent(reference, tmp_path / "run")
