"""train.compile: the local step's forward and backward as one torch.compile graph.

Eager is the reference. In float64 the compiled step replays the numpy reference as tightly
as eager does (rtol 1e-10); in float32 its fused kernels reorder sums, so compiled and eager
runs agree to rtol 1e-5 / atol 1e-6 after 3 rounds, not bitwise. A compiled run stopped and
resumed is bit-identical to the whole compiled run (the same kernels on the same inputs)."""
import numpy as np
import pytest
import torch

from dist_gradalign.engine import Preempted, Trainer

import fault_scenarios
from test_algorithms import ALGOS, _fit_tiny, _tiny, ref_run
from test_resume import _cfg, stop_after
from util import base_config, write_npz


@pytest.mark.parametrize("name, executor, extra", [
    ("fedga", "sequential", {"beta": 0.3}),
    ("gradalign", "sequential", {"beta": 0.3, "global_grad": "previous"}),
    ("scaffold", "vectorized", {"control": "stateful"}),
])
def test_compiled_step_matches_numpy_reference(tmp_path, name, executor, extra):
    algo = {"name": name, "lr": 0.4, "local_batch_size": 2, "full_grad_batch": "full", "weight_decay": 0.01,
            "server_lr": 0.7, "server_momentum": 0.5, "beta": 0.0, "mu": 0.0, "local_steps": 1,
            **ALGOS[name], **extra}
    t, _, shards, clients, W = _fit_tiny(tmp_path, algo, 4, 2, compile=True, executor=executor, comm="flat")
    assert t.fm.compiled is not None
    _, X, Y = _tiny(tmp_path)
    np.testing.assert_allclose(W, ref_run(algo, X, Y, 3, shards, clients)[0], rtol=1e-10, atol=1e-12)


def test_compiled_cnn_agrees_with_eager_in_float32(tmp_path):
    """cnn_emnist (convolutions, fused by inductor), FedGA, unequal batch sizes (recompiles)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(90, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 5, size=90)
    path = write_npz(tmp_path / "img.npz", x, y, x[:20], y[:20])
    out = {}
    for compile in (False, True):
        cfg = base_config(tmp_path / str(compile), data={"source": "npz", "root": str(path)},
                          model={"name": "cnn_emnist"},
                          algorithm={"name": "fedga", "lr": 0.05, "beta": 0.1, "local_steps": 2,
                                     "local_batch_size": 8, "full_grad_batch": "full"},
                          partition={"scheme": "dirichlet", "num_clients": 4, "alpha": 0.5},
                          train={"rounds": 3, "clients_per_round": 4, "compile": compile, "executor": "sequential"})
        t = Trainer(cfg)
        for r in (1, 2, 3):
            t.run_round(r)
        out[compile] = t.x
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-6)


def test_compiled_run_resumes_bit_identical(tmp_path):
    whole = _cfg(tmp_path / "whole", "fedga", compile=True)
    Trainer(whole).fit()
    part = _cfg(tmp_path / "part", "fedga", compile=True)
    with pytest.raises(Preempted):
        stop_after(Trainer(part), 3).fit()
    Trainer(part).fit()
    fault_scenarios.assert_same_run(whole.run_dir, part.run_dir)
