"""Learning-rate schedules (algorithm.lr_schedule): each shape against its formula, a scheduled
run against a hand-written one, resume in the middle of a warmup, and the config errors."""
import math

import numpy as np
import pytest
import torch

import dist_gradalign as dg
from dist_gradalign.algorithms.schedule import lr_factor
from dist_gradalign.config import AlgorithmConfig, ConfigError, from_dict
from dist_gradalign.engine import Preempted, Trainer
from util import base_config, load_params, run_dir_rows, write_npz


def test_each_shape_follows_its_formula():
    warm = AlgorithmConfig(warmup_rounds=4)
    assert [lr_factor(warm, t, 10) for t in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    step = AlgorithmConfig(lr_schedule="step", lr_milestones=[3, 6], lr_gamma=0.5)
    assert [lr_factor(step, t, 10) for t in range(1, 9)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    cos = AlgorithmConfig(lr_schedule="cosine", warmup_rounds=2, lr_min_factor=0.1)
    assert lr_factor(cos, 1, 12) == 0.5 and lr_factor(cos, 3, 12) == 1.0  # warmup, then the decay's start
    for t in range(3, 13):  # p = (t - 3) / 10
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 3) / 10))
        assert lr_factor(cos, t, 12) == pytest.approx(want, rel=1e-15)
    assert lr_factor(cos, 12, 12) > 0.1 and lr_factor(cos, 8, 12) == pytest.approx(0.55)  # half way: the mean


def test_a_scheduled_run_is_the_hand_written_loop(tmp_path):
    """lbsgd, one client, full batch, logistic regression from zero, warmup 2 then step decay,
    server_lr scheduled too: x_{t+1} = x_t - server_lr s(t) lr s(t) g(x_t), in numpy."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(24, 3)).astype(np.float32).astype(np.float64), rng.integers(0, 3, 24)
    npz = write_npz(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    cfg = base_config(tmp_path, source="npz", root=str(npz), model={"name": "logreg"},
                      partition={"scheme": "iid", "num_clients": 1},
                      algorithm={"name": "lbsgd", "lr": 0.8, "local_steps": 1, "local_batch_size": "full",
                                 "warmup_rounds": 2, "lr_schedule": "step", "lr_milestones": [3], "lr_gamma": 0.5,
                                 "schedule_server": True, "server_lr": 0.5},
                      train={"rounds": 5, "clients_per_round": 1, "precision": "float64"})
    result = dg.fit(cfg)
    factors = [0.5, 1.0, 1.0, 0.5, 0.5]
    assert [r["lr"] for r in result.metrics] == [0.8 * f for f in factors]
    W, b, onehot = np.zeros((3, 3)), np.zeros(3), np.eye(3)[y]
    for f in factors:
        z = x @ W.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        step = 0.5 * f * 0.8 * f
        W, b = W - step * (p - onehot).T @ x / 24, b - step * (p - onehot).mean(0)
    np.testing.assert_allclose(result.model.linear.weight.detach().numpy(), W, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.model.linear.bias.detach().numpy(), b, rtol=0, atol=1e-12)


def test_beta_scaled_follows_the_factor_and_fixed_does_not(tmp_path):
    for rule, want in (("fixed", 0.2), ("scaled", 0.2 * 0.25)):
        cfg = base_config(tmp_path / rule, algorithm={"name": "fedga", "beta": 0.2, "warmup_rounds": 4,
                                                      "beta_schedule": rule})
        algo = Trainer(cfg).algo
        algo.set_round(1, 10)
        assert algo.beta == pytest.approx(want) and algo.lr == pytest.approx(0.025)


def test_resume_in_the_middle_of_a_warmup_is_bit_identical(tmp_path):
    def cfg(sub):
        return base_config(tmp_path / sub, algorithm={"name": "fedga", "beta": 0.1, "warmup_rounds": 4,
                                                      "lr_schedule": "cosine", "lr_min_factor": 0.1},
                           train={"rounds": 7, "checkpoint_every": 1})
    Trainer(cfg("whole")).fit()
    part = Trainer(cfg("part"))
    real = part.run_round

    def stop_after_two(rnd):
        row = real(rnd)
        part.stop_agreed = rnd == 2
        return row
    part.run_round = stop_after_two
    with pytest.raises(Preempted):
        part.fit()
    Trainer(cfg("part")).fit()
    a, b = load_params(tmp_path / "whole" / "run"), load_params(tmp_path / "part" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [{k: v for k, v in r.items() if k != "time"} for r in run_dir_rows(tmp_path / "part" / "run")]
    assert rows == [{k: v for k, v in r.items() if k != "time"} for r in run_dir_rows(tmp_path / "whole" / "run")]


def test_cosine_resume_with_other_rounds_is_refused(tmp_path):
    cfg = base_config(tmp_path, algorithm={"name": "fedavg", "lr_schedule": "cosine"}, train={"rounds": 3})
    Trainer(cfg).fit()
    cfg.train.rounds = 5
    with pytest.raises(Exception, match="cosine schedule over train.rounds = 3"):
        Trainer(cfg).fit()


@pytest.mark.parametrize("algorithm, train, match", [
    ({"lr_milestones": [5]}, {}, "lr_milestones = \\[5\\] is not allowed with algorithm.lr_schedule = 'constant'"),
    ({"lr_schedule": "step"}, {}, "give increasing rounds >= 1"),
    ({"lr_schedule": "step", "lr_milestones": [5, 3]}, {}, "give increasing rounds >= 1"),
    ({"lr_schedule": "cosine", "warmup_rounds": 10}, {"rounds": 10}, "warmup_rounds = 10 is out of range"),
    ({"lr_gamma": 0.0}, {}, "lr_gamma = 0.0 is out of range"),
])
def test_bad_schedules_are_config_errors(tmp_path, algorithm, train, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"algorithm": algorithm, "train": train})
