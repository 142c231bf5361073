"""Real gloo process groups under torchrun: world-size invariance and an end-to-end run."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dist_gradalign.config import from_dict
from util import ALGOS, EMNIST47, REPO, base_config, load_params, run_dir_rows

sys.path.insert(0, str(REPO / "bench"))
from stream import descendants  # noqa: E402  (bench/stream.py: the process tree under a pid)

WORLDS = (1, 2, 4)


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # torchrun, its ranks (own sessions) and their workers: none may linger
        for pid in reversed(descendants(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = proc.communicate()
        raise AssertionError(f"torchrun {' '.join(args)} ran over {timeout} s; stderr tail:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# Bucketed communication (the default) against one flat all-reduce per pass: the algorithms
# whose gradient passes it overlaps, buckets of 1 KiB (the 1,210-parameter MLP makes 5), and
# micro-batches (several backward passes per bucket).
COMM = {"lbsgd": {}, "gradalign": {}, "scaffold": {}, "gradalign-micro": {"micro_batch_size": 5}}


def _configs(root, world):
    out = []

    def add(name, algo_name, train=None, **algo_kw):
        algo = {"name": algo_name, "lr": 0.1, "local_steps": 3, "local_batch_size": 16, "weight_decay": 1e-3,
                **ALGOS[algo_name], **algo_kw}
        cfg = base_config(root / f"w{world}" / name, algorithm=algo, data={"val_fraction": 0.1},
                          partition={"scheme": "dirichlet", "num_clients": 6, "alpha": 1.0},
                          train={"rounds": 4, "clients_per_round": 5, "eval_every": 2, "bucket_mb": 2**-10,
                                 "diagnostics_every": 3, **(train or {})})
        out.append(cfg.to_dict())

    for name in ALGOS:
        add(name, name)
    add("gradalign-adam", "gradalign", server_opt="adam", server_momentum=0.9, server_lr=0.05)
    add("fedga-yogi", "fedga", server_opt="yogi", server_momentum=0.9, server_lr=0.05)
    add("fedga-previous", "fedga", global_grad="previous")
    add("gradalign-previous", "gradalign", global_grad="previous")
    add("fedprox-displaced", "fedprox", displacement="fresh", beta=0.1)
    add("scaffold-displaced", "scaffold", displacement="fresh", beta=0.1)
    add("lbsgd-displaced-previous", "lbsgd", displacement="previous", beta=0.1)
    add("fedga-warmup-cosine", "fedga", warmup_rounds=2, lr_schedule="cosine", beta_schedule="scaled",
        schedule_server=True, server_lr=0.9)
    add("scaffold-stateful", "scaffold", control="stateful")
    if world in (2, 4):  # per-client state started on 2 ranks, resumed on 4: it moves to the new owners
        for name in ("scaffold-stateful", "feddyn"):
            src = next(d for d in out if d["run_dir"] == str(root / f"w{world}" / name / "run"))
            cfg = from_dict({**src, "run_dir": str(root / "moved" / name / "run")})
            cfg.train.rounds = 2 if world == 2 else 4
            out.append(cfg.to_dict())
    add("fedga-compile", "fedga", {"compile": True})
    for name, train in COMM.items():
        add(name + "-flat", name.split("-")[0], {**train, "comm": "flat"})
        if name not in ALGOS:
            add(name, name.split("-")[0], train)
    # fewer clients per round than ranks: one rank holds none (and launches its buckets empty)
    for name, algo in (("few", {"name": "fedga", "beta": 0.1, "local_steps": 2}),
                       ("few-gradalign", {"name": "gradalign", "beta": 0.1, "local_steps": 1})):
        cfg = base_config(root / f"w{world}" / name, algorithm=algo,
                          train={"rounds": 3, "clients_per_round": 3, "bucket_mb": 2**-10})
        out.append(cfg.to_dict())
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    for world in WORLDS:
        spec = root / f"configs{world}.json"
        spec.write_text(json.dumps(_configs(root, world)))
        proc = torchrun(world, "tests/dist_worker.py", str(spec))
        assert proc.returncode == 0, proc.stderr[-3000:]
        if world > 1:  # only rank 0 prints its one-line summaries
            assert proc.stdout.count("rank(s) ->") == len(_configs(root, world)), proc.stdout
    return root


@pytest.mark.parametrize("name", [*ALGOS, "gradalign-adam", "fedga-yogi", "fedga-previous", "fedga-warmup-cosine",
                                  "fedprox-displaced", "scaffold-displaced", "lbsgd-displaced-previous",
                                  "gradalign-previous", "scaffold-stateful", "fedga-compile", "gradalign-micro", *(n + "-flat" for n in COMM),
                                  "few", "few-gradalign"])
def test_world_size_invariance(runs, name):
    ref = load_params(runs / "w1" / name / "run")
    ref_rows = run_dir_rows(runs / "w1" / name / "run")
    for world in WORLDS[1:]:
        params = load_params(runs / f"w{world}" / name / "run")
        for key in ref:
            torch.testing.assert_close(params[key], ref[key], rtol=0, atol=1e-5, msg=f"{name} {key} world {world}")
        rows = run_dir_rows(runs / f"w{world}" / name / "run")
        for a, b in zip(ref_rows, rows):
            for key in ("round", "comm_rounds", "updates", "samples", "bytes", "clients"):
                assert a[key] == b[key], (name, world, key)
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
            for key in ("test_acc", "val_acc"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], abs=1e-3), (name, world, key)
            assert ("diag_grad_variance" in a) == ("diag_grad_variance" in b)
            if "diag_grad_variance" in a:  # the diagnostic r(x), summed over ranks
                assert b["diag_grad_variance"] == pytest.approx(a["diag_grad_variance"], rel=1e-4)


@pytest.mark.parametrize("name", ["scaffold-stateful", "feddyn"])
def test_per_client_state_resumes_on_another_world_size(runs, name):
    """Checkpointed after round 2 on 2 ranks (rank 0 gathers every c_i or h_i), resumed to round
    4 on 4 ranks (each takes the rows of the clients it now owns): the run of one rank throughout."""
    ref = load_params(runs / "w1" / name / "run")
    params = load_params(runs / "moved" / name / "run")
    for key in ref:
        torch.testing.assert_close(params[key], ref[key], rtol=0, atol=1e-5, msg=key)
    rows = run_dir_rows(runs / "moved" / name / "run")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert [r["clients"] for r in rows] == [r["clients"] for r in run_dir_rows(runs / "w1" / name / "run")]


@pytest.mark.parametrize("name", list(COMM))
def test_bucketed_matches_flat(runs, name):
    """Overlapped bucketed all-reduces give the result of one flat all-reduce per pass, with
    the same bytes, on 1, 2 and 4 ranks."""
    for world in WORLDS:
        flat = run_dir_rows(runs / f"w{world}" / f"{name}-flat" / "run")
        rows = run_dir_rows(runs / f"w{world}" / name / "run")
        assert [r["bytes"] for r in rows] == [r["bytes"] for r in flat]
        for a, b in zip(flat, rows):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        ref = load_params(runs / f"w{world}" / f"{name}-flat" / "run")
        params = load_params(runs / f"w{world}" / name / "run")
        for key in ref:
            torch.testing.assert_close(params[key], ref[key], rtol=0, atol=1e-5, msg=f"{name} {key} world {world}")


def test_end_to_end_cli_beats_chance(tmp_path):
    """torchrun --nproc_per_node 2 of the real CLI on real data (EMNIST-47 where staged,
    else the bundled digits), with a config file plus dotted overrides."""
    if EMNIST47.exists():
        data = f"data.source=npz data.root={EMNIST47} data.normalize=[0.5,0.5] model.name=cnn_emnist"
        clients, chance, rounds = 47, 1 / 47, 15
    else:
        data = "data.source=digits model.name=mlp"
        clients, chance, rounds = 10, 1 / 10, 15
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nalgorithm:\n  name: fedga\n  lr: 0.05\n  local_steps: 5\n"
                   f"  local_batch_size: 32\n  full_grad_batch: 256\n  beta: 0.05\n  weight_decay: 0.001\n")
    proc = torchrun(2, "-m", "dist_gradalign", "train", str(cfg), *data.split(),
                    "partition.scheme=iid", f"partition.num_clients={clients}", "train.clients_per_round=10",
                    f"train.rounds={rounds}", "train.eval_every=5", "logging.wandb.enabled=true",
                    "logging.wandb.mode=offline", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = run_dir_rows(tmp_path / "run")
    assert len(rows) == rounds and rows[-1]["comm_rounds"] == 2 * rounds
    acc = rows[-1]["test_acc"]
    assert acc > 10 * chance or acc > 0.5, f"test accuracy {acc} vs chance {chance}"
    assert "fedga: 15 rounds" in proc.stdout
    for f in ("config.yaml", "partition.json", "metrics.jsonl", "model.pt", "summary.json", "wandb_run_id"):
        assert (tmp_path / "run" / f).is_file(), f
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1, "rank 0 alone logs to W&B"


def test_torchvision_source_with_download_under_two_ranks(tmp_path):
    """data.download=true under torchrun: local rank 0 fetches first, the others wait and read.
    (The MNIST files are staged here, so torchvision finds them and downloads nothing.)"""
    import numpy as np
    from test_data import write_idx

    rng = np.random.default_rng(0)
    for split, n, name in (("train", 40, "train-{}-idx{}-ubyte"), ("test", 10, "t10k-{}-idx{}-ubyte")):
        write_idx(tmp_path / "MNIST" / "raw" / name.format("images", 3), rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / "MNIST" / "raw" / name.format("labels", 1), rng.integers(0, 10, n))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{source: mnist, root: {tmp_path}, download: true}}\n"
                   "model: {name: logreg}\npartition: {num_clients: 4}\nalgorithm: {local_steps: 1}\n"
                   "train: {rounds: 2, clients_per_round: 4, progress: false}\n")
    proc = torchrun(2, "-m", "dist_gradalign", "train", str(cfg), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(run_dir_rows(tmp_path / "run")) == 2


def test_a_restarted_group_ignores_the_previous_attempts_store_entry(monkeypatch):
    """attempt_store, as torchrun's agent leaves it after a restart: its shared store still names
    the previous attempt's store (a server that is gone, and one alive but another attempt's).
    Rank 1 must skip both and join the store rank 0 of this attempt hosts; keys written there are
    not in the agent's store."""
    import datetime
    import threading
    import torch.distributed as dist
    from dist_gradalign import backend

    timeout = datetime.timedelta(seconds=30)
    agent = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=timeout, wait_for_workers=False)
    gone = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout, wait_for_workers=False)
    dead_port = gone.port
    del gone  # its server stops: the address a killed rank 0 leaves behind
    other = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout, wait_for_workers=False)
    other.set("token", "another-attempt")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setattr(backend, "PROBE_S", 0.5)
    agent.set(backend.ATTEMPT_KEY, f"stale-token {dead_port}")
    stores, errors = {}, []

    def rank(r: int) -> None:
        try:
            stores[r] = backend.attempt_store(r, 2, timeout)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    one = threading.Thread(target=rank, args=(1,))
    one.start()  # reads the dead entry first
    threading.Event().wait(1.0)
    agent.set(backend.ATTEMPT_KEY, f"another-attempt-token {other.port}")  # alive, but not this attempt's
    threading.Event().wait(1.0)
    zero = threading.Thread(target=rank, args=(0,))
    zero.start()
    zero.join(60)
    one.join(60)
    assert not errors and set(stores) == {0, 1}
    assert stores[0].port == stores[1].port != other.port
    stores[1].set("gloo/key", "x")
    assert stores[0].get("gloo/key") == b"x" and not agent.check(["gloo/key"])
