"""The vectorized executor (vmap over clients) computes the same rounds as the sequential one."""
import numpy as np
import pytest
import torch

from dist_gradalign.config import ConfigError
from dist_gradalign.engine import Trainer

from util import ALGOS, base_config, write_npz


def _final(tmp_path, executor, name, **kw):
    algo = {"name": name, "lr": 0.1, "local_steps": 3, "local_batch_size": 16, "weight_decay": 1e-3, **ALGOS[name],
            **kw.pop("algorithm", {})}
    cfg = base_config(tmp_path / executor, algorithm=algo, train={"rounds": 3, "clients_per_round": 5,
                      "executor": executor, **kw.pop("train", {})},
                      partition={"scheme": "dirichlet", "num_clients": 6, "alpha": 1.0}, **kw)
    t = Trainer(cfg)
    rows = [t.run_round(r) for r in (1, 2, 3)]
    return t.x, rows


@pytest.mark.parametrize("name", list(ALGOS))
def test_vectorized_matches_sequential(tmp_path, name):
    xs, rows_s = _final(tmp_path, "sequential", name)
    xv, rows_v = _final(tmp_path, "vectorized", name)
    torch.testing.assert_close(xv, xs, rtol=1e-5, atol=1e-6)
    for a, b in zip(rows_s, rows_v):
        assert a["clients"] == b["clients"] and a["samples"] == b["samples"] and a["bytes"] == b["bytes"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        if "grad_variance" in a:
            assert b["grad_variance"] == pytest.approx(a["grad_variance"], rel=1e-4)


def test_vectorized_cnn_with_augmentation_and_unequal_full_batches(tmp_path):
    """cnn_cifar, crop+flip augmentation, full-shard batches of unequal sizes (several vmap groups)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 4, size=60)
    path = write_npz(tmp_path / "img.npz", x, y, x[:8], y[:8])
    out = {}
    for executor in ("sequential", "vectorized"):
        cfg = base_config(tmp_path / executor, data={"source": "npz", "root": str(path), "augment": "crop_flip"},
                          model={"name": "cnn_cifar"},
                          algorithm={"name": "fedga", "lr": 0.05, "beta": 0.1, "local_steps": 2,
                                     "local_batch_size": "full"},
                          partition={"scheme": "dirichlet", "num_clients": 5, "alpha": 0.5},
                          train={"rounds": 2, "clients_per_round": 5, "executor": executor})
        t = Trainer(cfg)
        assert len({len(s) for s in t.shards_np}) > 1, "needs unequal shard sizes"
        for r in (1, 2):
            t.run_round(r)
        out[executor] = t.x
    torch.testing.assert_close(out["vectorized"], out["sequential"], rtol=1e-4, atol=1e-5)


def test_vectorized_refuses_micro_batches(tmp_path):
    with pytest.raises(ConfigError, match="micro_batch_size = 8 is not allowed with train.executor"):
        base_config(tmp_path, train={"executor": "vectorized", "micro_batch_size": 8})


@pytest.mark.parametrize("name", ["fedga", "gradalign"])
def test_vectorized_matches_sequential_with_previous_global_grad(tmp_path, name):
    xs, _ = _final(tmp_path, "sequential", name, algorithm={"global_grad": "previous"})
    xv, _ = _final(tmp_path, "vectorized", name, algorithm={"global_grad": "previous"})
    torch.testing.assert_close(xv, xs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, device, per_round, world, micro, expected", [
    ("mlp", "cpu", 10, 1, None, "vectorized"),     # CPU mlp from 10 clients per rank (1.30x measured)
    ("mlp", "cpu", 10, 2, None, "sequential"),     # 5 per rank: 0.93x
    ("mlp", "cpu", 47, 1, 8, "sequential"),        # micro-batches: sequential only
    ("cnn_emnist", "cpu", 47, 1, None, "sequential"),  # convolutions on CPU: never
    ("cnn_emnist", "cuda", 10, 2, None, "vectorized"),  # GPU from 5 per rank
    ("cnn_emnist", "cuda", 10, 4, None, "sequential"),  # 3 per rank
])
def test_auto_executor_rule(model, device, per_round, world, micro, expected):
    from dist_gradalign.config import ModelConfig
    from dist_gradalign.executor import choose_executor
    from dist_gradalign.models import build_model
    module = build_model(ModelConfig(name=model), (1, 28, 28), 47)
    rec = choose_executor("auto", torch.device(device), module, per_round, world, micro)
    assert rec["executor"] == expected, rec
    assert rec["requested"] == "auto" and rec["reason"]
    assert choose_executor("sequential", torch.device(device), module, per_round, world, None)["executor"] == "sequential"


@pytest.mark.parametrize("per_round, expected", [(10, "vectorized"), (4, "sequential")])
def test_auto_executor_is_recorded_and_runs(tmp_path, per_round, expected):
    """The default (auto) picks, prints and records the executor; the run equals the explicit one."""
    import json
    cfg = base_config(tmp_path / "auto", algorithm={"name": "fedavg", "lr": 0.1, "local_steps": 2},
                      partition={"scheme": "iid", "num_clients": 10},
                      train={"rounds": 2, "clients_per_round": per_round})
    assert cfg.train.executor == "auto"
    Trainer(cfg).fit()
    rec = json.loads((tmp_path / "auto" / "run" / "executor.json").read_text())
    assert rec["executor"] == expected and rec["requested"] == "auto" and rec["clients_per_rank"] == per_round
    explicit = base_config(tmp_path / expected, algorithm={"name": "fedavg", "lr": 0.1, "local_steps": 2},
                           partition={"scheme": "iid", "num_clients": 10},
                           train={"rounds": 2, "clients_per_round": per_round, "executor": expected})
    Trainer(explicit).fit()
    from util import load_params
    a, b = load_params(cfg.run_dir), load_params(explicit.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
