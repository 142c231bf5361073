"""Checkpoints and exact resume, preemption by signal, rank failure under torchrun, divergence."""
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_gradalign import checkpoint
from dist_gradalign.data import partition, sample_clients
from dist_gradalign.engine import DivergenceError, Preempted, Trainer

import fault_scenarios
from util import ALGOS, base_config, run_dir_rows, write_npz



def _cfg(root, name, rounds=6, **train):
    algo = {"name": name, "lr": 0.1, "local_steps": 3, "local_batch_size": 16, "weight_decay": 1e-3, **ALGOS[name]}
    return base_config(root, algorithm=algo, partition={"scheme": "dirichlet", "num_clients": 6, "alpha": 1.0},
                       train={"rounds": rounds, "clients_per_round": 4, "eval_every": 2, "checkpoint_every": 2, **train})



def stop_after(t: Trainer, k: int) -> Trainer:
    """Make ``t`` stop after round k as a preempted run does (the flag rides on round k's all-reduce)."""
    run_round = t.run_round

    def wrapped(rnd):
        t.stop_requested = t.stop_requested or rnd == k
        return run_round(rnd)
    t.run_round = wrapped
    return t


@pytest.mark.parametrize("name", list(ALGOS))
def test_stop_anywhere_and_resume_is_bit_identical(tmp_path, name):
    whole = _cfg(tmp_path / "whole", name)
    Trainer(whole).fit()
    for stop in (1, 3, 4):  # before, between and on periodic checkpoints
        cfg = _cfg(tmp_path / f"stop{stop}", name)
        with pytest.raises(Preempted, match=f"after round {stop} of 6"):
            stop_after(Trainer(cfg), stop).fit()
        assert len(run_dir_rows(cfg.run_dir)) == stop
        Trainer(cfg).fit()  # a new process would do the same: nothing carries over but the files
        fault_scenarios.assert_same_run(whole.run_dir, cfg.run_dir)


def test_checkpoint_contents_and_retention(tmp_path):
    cfg = _cfg(tmp_path, "fedavg", rounds=9, keep_checkpoints=2)
    Trainer(cfg).fit()
    files = checkpoint.list_checkpoints(Path(cfg.run_dir) / "checkpoints")
    assert [f.name for f in files] == ["ckpt-00000008.pt", "ckpt-00000009.pt"]
    state = torch.load(files[-1], weights_only=True)
    assert state["round"] == 9 and state["counters"]["updates"] == 27 and state["world_size"] == 1
    assert state["algorithm"]["momentum"] is not None  # server momentum is part of the state
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    assert state["config"]["algorithm"]["server_momentum"] == 0.5


def test_corrupted_checkpoint_is_skipped_for_the_previous_one(tmp_path, capsys):
    whole = _cfg(tmp_path / "whole", "fedga")
    Trainer(whole).fit()
    cfg = _cfg(tmp_path / "part", "fedga")
    with pytest.raises(Preempted):
        stop_after(Trainer(cfg), 5).fit()  # checkpoints at rounds 2, 4 and 5
    ckpts = checkpoint.list_checkpoints(Path(cfg.run_dir) / "checkpoints")
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:1000])  # truncated
    data = bytearray(ckpts[-2].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    ckpts[-2].write_bytes(bytes(data))
    Trainer(cfg).fit()
    err = capsys.readouterr()
    assert err.err.count("checksum mismatch") == 2
    assert "resuming from" in err.out and "ckpt-00000002.pt (round 2)" in err.out
    fault_scenarios.assert_same_run(whole.run_dir, cfg.run_dir)


def test_signal_checkpoints_at_round_boundary_and_resumes(tmp_path):
    whole = _cfg(tmp_path / "whole", "scaffold", checkpoint_every=0)
    Trainer(whole).fit()
    cfg = _cfg(tmp_path / "sig", "scaffold", checkpoint_every=0)
    t = Trainer(cfg)
    run_round = t.run_round

    def round_then_signal(rnd):
        row = run_round(rnd)
        if rnd == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning signal, delivered mid-training
        return row
    t.run_round = round_then_signal
    with pytest.raises(Preempted, match="after round 4 of 6"):  # flag seen in round 4's all-reduce
        t.fit()
    assert [p.name for p in checkpoint.list_checkpoints(Path(cfg.run_dir) / "checkpoints")] == ["ckpt-00000004.pt"]
    assert len(run_dir_rows(cfg.run_dir)) == 4
    Trainer(cfg).fit()
    fault_scenarios.assert_same_run(whole.run_dir, cfg.run_dir)


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_divergence_names_round_client_and_quantity_and_keeps_checkpoint(tmp_path, executor):
    """One training sample is huge (finite: NaN or inf inputs are refused when the data is
    loaded), so its client's local steps overflow: the first round that samples that client
    stops the run with a message naming that round, that client and the quantity; the
    checkpoint before stays.
    (Both executors flag non-finite values on the device and name the client only then.)"""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 1, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=80)
    x[17] = 3e38  # near float32's largest: the first step's gradient overflows, the second loss is NaN
    path = write_npz(tmp_path / "nan.npz", x, y, x[:10], y[:10])
    cfg = base_config(tmp_path, source="npz", root=str(path), partition={"scheme": "iid", "num_clients": 8},
                      algorithm={"name": "fedavg", "lr": 0.1, "local_steps": 2, "local_batch_size": "full"},
                      train={"rounds": 30, "clients_per_round": 2, "checkpoint_every": 1, "executor": executor})
    bad_client = next(c for c, s in enumerate(partition(y, cfg.partition, cfg.seed)) if 17 in s)
    bad_round = next(r for r in range(1, 31) if bad_client in sample_clients(cfg.seed, r, 8, 2))
    assert bad_round > 1, "pick data where the bad client is not in round 1"
    with pytest.raises(DivergenceError) as e:
        Trainer(cfg).fit()
    assert str(e.value).startswith(f"round {bad_round}: client {bad_client}: its training loss (nan) (rank 0) "
                                   "is not finite; the last good checkpoint is kept in")
    kept = checkpoint.list_checkpoints(Path(cfg.run_dir) / "checkpoints")
    assert kept[-1].name == f"ckpt-{bad_round - 1:08d}.pt"
    assert torch.isfinite(torch.load(kept[-1], weights_only=True)["x"]).all()
    assert len(run_dir_rows(cfg.run_dir)) == bad_round - 1  # no row for the diverged round


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    return fault_scenarios.reference(tmp_path_factory.mktemp("ref"))


@pytest.mark.parametrize("scenario", list(fault_scenarios.SCENARIOS))
def test_rank_failure_under_torchrun_resumes_exactly(tmp_path, reference_run, scenario):
    """SIGTERM to one rank (all checkpoint and stop; the same command resumes) and SIGKILL to
    one rank under --max-restarts (torchrun restarts the group, which resumes), once each, with
    no retry: ``python tests/fault_scenarios.py --repeat 20`` repeats them."""
    fault_scenarios.SCENARIOS[scenario](tmp_path, scenario)
    fault_scenarios.assert_same_run(reference_run, tmp_path / scenario)


def _stop_at_3_then_resume(tmp_path, name: str, algorithm: dict, state_key: str | None) -> None:
    """A run stopped after round 3 and resumed equals the whole run, and the algorithm state
    ``state_key`` (if any) is in the checkpoint."""
    def cfg(root):
        c = _cfg(root, name)
        for key, value in algorithm.items():
            setattr(c.algorithm, key, value)
        return c
    whole = cfg(tmp_path / "whole")
    Trainer(whole).fit()
    part = cfg(tmp_path / "part")
    with pytest.raises(Preempted):
        stop_after(Trainer(part), 3).fit()
    state = torch.load(checkpoint.list_checkpoints(Path(part.run_dir) / "checkpoints")[-1], weights_only=True)
    if state_key is not None:
        assert state["algorithm"][state_key] is not None and state["algorithm"][state_key].abs().sum() > 0
    Trainer(part).fit()
    fault_scenarios.assert_same_run(whole.run_dir, part.run_dir)


@pytest.mark.parametrize("opt", ["adam", "yogi", "adagrad"])
def test_adaptive_server_state_resumes_bit_identical(tmp_path, opt):
    _stop_at_3_then_resume(tmp_path, "fedga", {"server_opt": opt, "server_momentum": 0.9, "server_lr": 0.05},
                           "second")


@pytest.mark.parametrize("name", ["fedga", "gradalign"])
def test_previous_direction_resumes_bit_identical(tmp_path, name):
    _stop_at_3_then_resume(tmp_path, name, {"global_grad": "previous"}, "direction")


@pytest.mark.parametrize("name, displacement, state_key", [
    ("fedprox", "fresh", None), ("scaffold", "fresh", None), ("feddyn", "fresh", None),
    ("fedprox", "previous", "direction"), ("feddyn", "previous", "direction")])
def test_the_displacement_on_other_rules_resumes_bit_identical(tmp_path, name, displacement, state_key):
    """Issue 27: every rule with ``algorithm.displacement`` stops and resumes bit-identically
    (with ``previous``, the stored direction is in the checkpoint)."""
    _stop_at_3_then_resume(tmp_path, name, {"displacement": displacement, "beta": 0.1}, state_key)


def test_stateful_scaffold_resumes_bit_identical(tmp_path):
    """The server's c in the algorithm state and every client's c_i in the checkpoint."""
    _stop_at_3_then_resume(tmp_path, "scaffold", {"control": "stateful"}, "control")
    state = torch.load(checkpoint.list_checkpoints(tmp_path / "part" / "run" / "checkpoints")[-1], weights_only=True)
    assert state["clients"] and all(t.abs().sum() > 0 for t in state["clients"].values())


def test_a_run_stopped_after_its_last_checkpoint_writes_its_outputs_when_run_again(tmp_path):
    """Killed between the final checkpoint and model.pt/summary.json: running it again writes
    them from the checkpoint (and trains nothing), so a sweep does not redo it forever."""
    cfg = _cfg(tmp_path, "fedavg", rounds=4)
    Trainer(cfg).fit()
    run_dir = Path(cfg.run_dir)
    model, summary = (run_dir / "model.pt").read_bytes(), (run_dir / "summary.json").read_text()
    (run_dir / "model.pt").unlink()
    (run_dir / "summary.json").unlink()
    Trainer(cfg).fit()
    assert (run_dir / "summary.json").read_text() == summary
    assert (run_dir / "model.pt").read_bytes() == model
    assert [r["round"] for r in run_dir_rows(run_dir)] == [1, 2, 3, 4]
