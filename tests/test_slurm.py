"""slurm/*.sbatch against a real single-node Slurm cluster (slurm/local-cluster.sh up).

The module fixture installs (apt) and starts Slurm on this machine when it is not up yet; the
module is skipped only when that is impossible here (not root, slurm-wlm/munge cannot be
installed, or /etc/slurm/slurm.conf belongs to another Slurm). Every job is bounded (sbatch --time and a subprocess timeout, then scancel), so a
broken cluster fails the tests instead of hanging them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fault_scenarios  # noqa: E402  (pids: the training ranks of a run)

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
JOB_TIMEOUT = 300  # seconds per sbatch --wait

TINY = {
    "data": {"source": "digits"},
    "model": {"name": "mlp", "hidden": [16]},
    "partition": {"scheme": "iid", "num_clients": 4},
    "algorithm": {"name": "fedavg", "lr": 0.1, "local_steps": 2, "local_batch_size": 16},
    "train": {"rounds": 3, "clients_per_round": 4, "eval_every": 1, "progress": False},
}


@pytest.mark.parametrize("script", ["train.sbatch", "sweep-array.sbatch", "common.sh", "local-cluster.sh"])
def test_scripts_parse(script):
    """bash -n: the scripts are syntactically valid (needs no cluster)."""
    proc = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_defaults():
    """The #SBATCH defaults users rely on (job name, one torchrun per node, output, requeue)."""
    train = (SLURM / "train.sbatch").read_text()
    for line in ("--ntasks-per-node=1", "--job-name=dist-gradalign", "--output=slurm-%x-%j.out",
                 "--signal=B:USR1@120", "--requeue"):
        assert f"#SBATCH {line}\n" in train
    sweep = (SLURM / "sweep-array.sbatch").read_text()
    for line in ("--ntasks-per-node=1", "--output=slurm-%x-%A_%a.out", "--requeue"):
        assert f"#SBATCH {line}\n" in sweep


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    try:
        proc = subprocess.run(["bash", str(SLURM / "local-cluster.sh"), "up"], capture_output=True,
                              text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.fail("slurm/local-cluster.sh up did not finish in 1200 s")
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
    # 2: not root, 3: slurm-wlm/munge not installable, 4: a foreign /etc/slurm/slurm.conf
    # (a real Slurm host): no local test cluster possible here.
    if proc.returncode in (2, 3, 4):
        pytest.skip(f"no local Slurm cluster (local-cluster.sh up exited {proc.returncode}): "
                    f"{tail.splitlines()[-1] if tail else ''}")
    assert proc.returncode == 0, f"slurm/local-cluster.sh up failed:\n{tail}"
    assert shutil.which("sbatch"), "sbatch not on PATH after local-cluster.sh up"


def job_env(**extra: str) -> dict[str, str]:
    """The test's environment for the job (sbatch --export=ALL), with torchrun reachable."""
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "disabled", **extra}
    env.pop("DIST_GRADALIGN_VENV", None)
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    # The job activates $DIST_GRADALIGN_VENV (default: $SLURM_SUBMIT_DIR/.venv) if it exists;
    # also keep this interpreter's bin/ (which holds torchrun) on PATH for non-venv setups.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def this_venv() -> Path | None:
    prefix = Path(sys.prefix)
    return prefix if (prefix / "bin" / "activate").is_file() else None


def sbatch_wait(args: list[str], cwd: Path, env: dict[str, str], name: str) -> tuple[int, str]:
    """sbatch --wait ARGS; returns (exit code, job id). Cancels the job if it overruns."""
    cmd = ["sbatch", "--wait", "--parsable", f"--job-name={name}", "--time=10", *args]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True)
        queue = subprocess.run(["squeue", "-a"], capture_output=True, text=True).stdout
        pytest.fail(f"job {name} did not finish in {JOB_TIMEOUT} s (cancelled); squeue:\n{queue}")
    job_id = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else ""
    assert job_id.isdigit(), f"sbatch printed no job id: {proc.stdout!r} {proc.stderr!r}"
    return proc.returncode, job_id


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def pending(pid: int, sig: int) -> bool:
    """SIG is pending for process PID (delivered while it is stopped)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) >> (sig - 1) & 1:
            return True
    return False


def read_out(path: Path) -> str:
    assert path.is_file(), f"no Slurm output file {path} (have: {sorted(p.name for p in path.parent.iterdir())})"
    return path.read_text()


def test_train_sbatch_two_ranks(cluster, tmp_path):
    """sbatch --wait slurm/train.sbatch with NPROC_PER_NODE=2: a real 2-rank torchrun job."""
    run_dir = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "run_dir": str(run_dir)}))
    venv = this_venv()
    env = job_env(**({"DIST_GRADALIGN_VENV": str(venv)} if venv else {}))
    name = f"dga-test-train-{uuid.uuid4().hex[:8]}"
    # Submitted from tmp_path with the script's absolute path: the default --output lands in
    # tmp_path and the script must find slurm/common.sh through the submitted path.
    rc, job = sbatch_wait(["--export=ALL,NPROC_PER_NODE=2", str(SLURM / "train.sbatch"), str(cfg)],
                          cwd=tmp_path, env=env, name=name)
    out = read_out(tmp_path / f"slurm-{name}-{job}.out")
    assert rc == 0, f"job {job} exited {rc}:\n{out}"
    assert len(rows(run_dir)) == 3, out
    assert (run_dir / "model.pt").is_file() and (run_dir / "config.yaml").is_file(), out
    assert "fedavg: 3 rounds" in out, out
    assert "2 rank(s)" in out, out


def test_sweep_array(cluster, tmp_path):
    """A 2-task job array via slurm/sweep-array.sbatch: both runs finish with their own args."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    runs = tmp_path / "runs.txt"
    # Shell-quoted lines; the second has an argument with a space (parsed by eval "set -- ...").
    runs.write_text(f"{cfg} seed=1 run_dir={tmp_path}/sweep/seed=1\n"
                    f"{cfg} seed=2 run_dir={tmp_path}/sweep/seed=2 'model.hidden=[16, 8]'\n")
    env = job_env()
    if this_venv() is not None and this_venv() != REPO / ".venv":
        env["DIST_GRADALIGN_VENV"] = str(this_venv())
    name = f"dga-test-sweep-{uuid.uuid4().hex[:8]}"
    # Submitted from the repository (relative script path; default venv $SLURM_SUBMIT_DIR/.venv)
    # and run in tmp_path (--chdir): RUNS_FILE is relative to it, and so is the output.
    rc, job = sbatch_wait(["--array=0-1", f"--chdir={tmp_path}", "slurm/sweep-array.sbatch", runs.name],
                          cwd=REPO, env=env, name=name)
    outs = [read_out(tmp_path / f"slurm-{name}-{job}_{task}.out") for task in (0, 1)]
    assert rc == 0, f"array job {job} exited {rc}:\n" + "\n".join(outs)
    for seed, out in zip((1, 2), outs):
        run_dir = tmp_path / "sweep" / f"seed={seed}"
        assert "fedavg: 3 rounds" in out and "1 rank(s)" in out, out
        assert len(rows(run_dir)) == 3, out
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert resolved["seed"] == seed
        assert resolved["model"]["hidden"] == ([16] if seed == 1 else [16, 8])


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(cluster, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit): every
    rank checkpoints at the next round boundary, the job requeues itself, and the requeued job
    resumes to the same final parameters and rows as a run left alone."""
    import torch

    spec = {**TINY, "model": {"name": "mlp", "hidden": [64]},
            "algorithm": {"name": "fedga", "lr": 0.1, "beta": 0.1, "local_steps": 4, "local_batch_size": 32},
            "train": {"rounds": 400, "clients_per_round": 4, "eval_every": 5, "checkpoint_every": 0,
                      "progress": False}}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump({**spec, "run_dir": str(ref_dir)}))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**spec, "run_dir": str(run_dir)}))
    venv = this_venv()
    env = job_env(**({"DIST_GRADALIGN_VENV": str(venv)} if venv else {}))
    rc, _ = sbatch_wait(["--export=ALL,NPROC_PER_NODE=2", str(SLURM / "train.sbatch"), str(tmp_path / "ref.yaml")],
                        cwd=tmp_path, env=env, name=f"dga-test-ref-{uuid.uuid4().hex[:8]}")
    assert rc == 0
    name = f"dga-test-preempt-{uuid.uuid4().hex[:8]}"
    sub = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", "--time=10", "--export=ALL,NPROC_PER_NODE=2",
                          str(SLURM / "train.sbatch"), str(tmp_path / "run.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    job = sub.stdout.strip().split(";")[0]
    assert job.isdigit(), sub.stderr
    try:
        deadline = time.time() + JOB_TIMEOUT
        # the ranks are stopped at round 20 until the step's SIGTERM is pending in both, so the
        # signal lands at a known round of a run that cannot end first (its rounds take ms)
        ranks = []
        while time.time() < deadline and len(ranks) < 2:
            ranks = fault_scenarios.pids(str(tmp_path / "run.yaml"))
            time.sleep(0.05)
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").is_file() and len(rows(run_dir)) >= 20):
            time.sleep(0.005)
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        assert len(rows(run_dir)) < 400
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
        while time.time() < deadline and not all(pending(pid, signal.SIGTERM) for pid in ranks):
            time.sleep(0.05)
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        while time.time() < deadline and not (run_dir / "summary.json").is_file():
            time.sleep(0.5)
        assert (run_dir / "summary.json").is_file(), read_out(tmp_path / f"slurm-{name}-{job}.out")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    out = read_out(tmp_path / f"slurm-{name}-{job}.out")
    assert "asking the ranks to checkpoint and stop" in out and "requeued" in out, out
    assert "preempted: stopped by a signal after round" in out, out
    assert "resuming from" in out, out  # the requeued job (appending to the same output file) resumed
    a, b = torch.load(ref_dir / "model.pt", weights_only=True), torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(rows(ref_dir)) == strip(rows(run_dir))
