"""The CUDA/NCCL path: skipped without a GPU (CI has none); run on a GPU machine with
``python -m pytest tests/test_gpu.py``. One GPU is enough: torchrun with one rank joins a real
NCCL process group of one, so the bucketed and flat all-reduces run through NCCL."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dist_gradalign.backend import Backend
from dist_gradalign.engine import Trainer

from util import REPO, base_config, load_params, run_dir_rows, write_npz

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """28x28 grayscale images whose class is the brightest of 4 quadrants (learnable)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 120, size=(800, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 4, size=800)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 14 * r:14 * r + 14, 14 * q:14 * q + 14] += 100
    return write_npz(tmp_path_factory.mktemp("gpu") / "quad.npz", x[:640], y[:640], x[640:], y[640:])


def _cfg(tmp, images, name, **train):
    algo = {"name": name, "lr": 0.05, "local_steps": 1 if name in ("lbsgd", "gradalign") else 3,
            "local_batch_size": 32, "full_grad_batch": 64, "beta": 0.05, "weight_decay": 1e-3}
    return base_config(tmp, source="npz", root=str(images), model={"name": "cnn_emnist"}, algorithm=algo,
                       partition={"scheme": "iid", "num_clients": 8},
                       train={"rounds": 20, "clients_per_round": 4, "eval_every": 20, "device": "cuda", **train})


@pytest.mark.parametrize("name", ["lbsgd", "gradalign", "fedga", "scaffold"])
def test_nccl_bucketed_matches_flat_and_learns(tmp_path, images, name):
    finals = {}
    for comm in ("flat", "bucketed"):
        cfg = _cfg(tmp_path / comm, images, name, comm=comm, bucket_mb=0.05)
        spec = tmp_path / f"{comm}.yaml"
        spec.write_text(__import__("yaml").safe_dump(cfg.to_dict()))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                               "-m", "dist_gradalign", "train", str(spec)], cwd=REPO, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "NCCL_DEBUG": "INFO"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "NCCL INFO" in proc.stdout + proc.stderr, "the run did not go through NCCL"
        finals[comm] = (load_params(cfg.run_dir), run_dir_rows(cfg.run_dir))
    (pf, rf), (pb, rb) = finals["flat"], finals["bucketed"]
    for key in pf:  # 20 rounds of float32 with cuDNN's own reduction orders: rounding drifts
        torch.testing.assert_close(pb[key], pf[key], rtol=1e-3, atol=2e-3)
    assert [r["bytes"] for r in rb] == [r["bytes"] for r in rf]
    assert rb[-1]["test_acc"] > 0.5, rb[-1]  # 4 classes: chance is 0.25


def test_vectorized_matches_sequential_on_cuda(tmp_path, images):
    xs = {}
    for ex in ("sequential", "vectorized"):
        t = Trainer(_cfg(tmp_path / ex, images, "fedga", executor=ex), Backend.from_env("cuda"))
        assert t.x.is_cuda
        for r in (1, 2, 3):
            t.run_round(r)
        xs[ex] = t.x
    torch.testing.assert_close(xs["vectorized"], xs["sequential"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_compile_agrees_with_eager_on_cuda(tmp_path, images, executor):
    """train.compile on the GPU: fused kernels, so a tolerance (cuDNN's own orders besides)."""
    xs = {}
    for compile in (False, True):
        t = Trainer(_cfg(tmp_path / f"{executor}-{compile}", images, "fedga", executor=executor, compile=compile),
                    Backend.from_env("cuda"))
        for r in (1, 2, 3):
            t.run_round(r)
        xs[compile] = t.x
    torch.testing.assert_close(xs[True], xs[False], rtol=1e-3, atol=1e-4)


def test_auto_executor_vectorizes_from_five_clients_per_rank_on_cuda(tmp_path, images):
    for per_round, expected in ((4, "sequential"), (5, "vectorized")):
        t = Trainer(_cfg(tmp_path / str(per_round), images, "fedavg", clients_per_round=per_round),
                    Backend.from_env("cuda"))
        assert t.executor_record["executor"] == expected, t.executor_record


def test_bf16_autocast_trains_like_float32(tmp_path, images):
    acc = {}
    for precision in ("float32", "bf16"):
        cfg = _cfg(tmp_path / precision, images, "gradalign", precision=precision)
        acc[precision] = Trainer(cfg, Backend.from_env("cuda")).fit()["test_acc"]
    assert acc["bf16"] > 0.5 and abs(acc["bf16"] - acc["float32"]) < 0.1, acc


def test_stream_matches_memory_on_cuda(tmp_path):
    """data.storage: stream on the GPU: pinned raw batches, converted on the device; the same
    run as memory mode (which converts on the CPU), and every batch came from the plan."""
    from test_stream import cfg_for, make_folder

    folder = make_folder(tmp_path / "tree")
    runs = {}
    for storage in ("memory", "stream"):
        cfg = cfg_for(tmp_path, folder, "fedga", storage, device="cuda")
        t = Trainer(cfg, Backend.from_env("cuda"))
        assert t.x.is_cuda
        if storage == "stream":
            assert t.data.loader.pin_memory
        t.fit()
        runs[storage] = t
    assert runs["stream"].data.misses == 0
    torch.testing.assert_close(runs["stream"].x, runs["memory"].x, rtol=1e-5, atol=1e-6)
