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
