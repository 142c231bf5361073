"""data.storage: stream reads batches from disk (image folders, .npy memory maps) and must give
bitwise the same run as memory, for every algorithm, on 1 and 2 ranks, across a resume."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_gradalign.config import ConfigError
from dist_gradalign.data.sources import DataError
from dist_gradalign.engine import Preempted, Trainer

import fault_scenarios
from test_distributed import torchrun
from test_resume import stop_after
from util import ALGOS, REPO, base_config, load_params, run_dir_rows


def make_folder(root: Path, per_class=(24, 6), classes=4, size=10, fmt="png") -> Path:
    """train/<c>/*, test/<c>/*: noisy images whose mean colour says the class (learnable)."""
    rng = np.random.default_rng(1)
    for split, n in zip(("train", "test"), per_class):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                base = np.array([60 * c, 255 - 60 * c, 128])
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i:03d}.{fmt}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images") / "tree")


def cfg_for(tmp_path: Path, root: Path, name: str, storage: str, source="imagefolder", **train):
    algo = {"name": name, "lr": 0.05, "local_steps": 2, "local_batch_size": 8, **ALGOS[name]}
    if name in ("lbsgd", "gradalign"):
        algo["local_steps"] = 1
    return base_config(tmp_path / storage, source=source, root=str(root),
                       data={"storage": storage, "augment": "crop_flip" if source == "imagefolder" else "none",
                             "val_fraction": 0.1, "normalize": [0.5, 0.25], "workers": 2, "prefetch": 2},
                       partition={"scheme": "dirichlet", "num_clients": 5, "alpha": 1.0},
                       algorithm=algo, train={"rounds": 4, "clients_per_round": 3, "eval_every": 2,
                                              "checkpoint_every": 2, "diagnostics_every": 2,
                                              "diagnostics_batch": 6, **train})


def fit(cfg) -> Trainer:
    t = Trainer(cfg)
    t.fit()
    return t


@pytest.mark.parametrize("name", list(ALGOS))
def test_stream_equals_memory_bitwise(tmp_path, folder, name):
    memory = fit(cfg_for(tmp_path, folder, name, "memory"))
    stream = fit(cfg_for(tmp_path, folder, name, "stream"))
    fault_scenarios.assert_same_run(memory.cfg.run_dir, stream.cfg.run_dir)
    assert stream.data.misses == 0, "the prefetch plan is out of step with the executor"
    rows = run_dir_rows(stream.cfg.run_dir)
    assert "val_acc" in rows[-1] and "diag_grad_variance" in rows[-1]
    record = json.loads((Path(stream.cfg.run_dir) / "data.json").read_text())
    assert record["storage"] == "stream" and record["requested"] == "stream" and record["workers"] == 2


@pytest.mark.parametrize("name", ["fedga", "scaffold", "gradalign"])
def test_stream_vectorized_and_inline_reads(tmp_path, folder, name):
    """The vectorized executor's gathers, and workers = 0 (reads in the training process)."""
    memory = fit(cfg_for(tmp_path, folder, name, "memory", executor="vectorized"))
    cfg = cfg_for(tmp_path, folder, name, "stream", executor="vectorized")
    cfg.data.workers = 0
    stream = fit(cfg)
    fault_scenarios.assert_same_run(memory.cfg.run_dir, stream.cfg.run_dir)
    assert stream.data.misses == 0


def test_stream_resume_is_exact(tmp_path, folder):
    whole = fit(cfg_for(tmp_path / "whole", folder, "fedga", "stream"))
    cfg = cfg_for(tmp_path / "part", folder, "fedga", "stream")
    with pytest.raises(Preempted):
        stop_after(Trainer(cfg), 3).fit()
    resumed = fit(cfg)
    fault_scenarios.assert_same_run(whole.cfg.run_dir, cfg.run_dir)
    assert resumed.data.misses == 0


def test_npy_directory_streams_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "arrays"
    root.mkdir()
    y = np.arange(120) % 3
    x = (rng.normal(size=(120, 6, 6, 1)) + y[:, None, None, None]).astype(np.float32)  # channels last
    for k, v in {"x_train": x[:90], "y_train": y[:90], "x_test": x[90:], "y_test": y[90:]}.items():
        np.save(root / f"{k}.npy", v)
    memory = fit(cfg_for(tmp_path, root, "scaffold", "memory", source="npy"))
    stream = fit(cfg_for(tmp_path, root, "scaffold", "stream", source="npy"))
    fault_scenarios.assert_same_run(memory.cfg.run_dir, stream.cfg.run_dir)
    assert isinstance(stream.data.readers["train"].split.x, np.memmap)


def test_two_ranks_stream_equals_memory(tmp_path, folder):
    """On 2 ranks stream equals memory bitwise; both agree with 1 rank (world-size invariance,
    to summation order)."""
    names = ["fedavg", "fedga", "gradalign", "scaffold"]
    one = {n: fit(cfg_for(tmp_path / f"one-{n}", folder, n, "stream")).cfg.run_dir for n in names}
    two = {(n, s): cfg_for(tmp_path / f"two-{n}", folder, n, s) for n in names for s in ("memory", "stream")}
    spec = tmp_path / "configs.json"
    spec.write_text(json.dumps([c.to_dict() for c in two.values()]))
    proc = torchrun(2, "tests/dist_worker.py", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n in names:
        fault_scenarios.assert_same_run(two[n, "memory"].run_dir, two[n, "stream"].run_dir)
        ref, got = load_params(one[n]), load_params(two[n, "stream"].run_dir)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-5, msg=f"{n} {key}")


def test_auto_chooses_by_budget_and_records_it(tmp_path, folder):
    small = cfg_for(tmp_path / "small", folder, "fedavg", "auto")
    small.data.memory_budget_gb = 1e-4  # 105 KiB: the 120 decoded images (141 KiB) do not fit
    t = fit(small)
    record = json.loads((Path(small.run_dir) / "data.json").read_text())
    assert record["storage"] == "stream" and record["requested"] == "auto"
    assert record["decoded_bytes_per_rank"] == 120 * 3 * 10 * 10 * 4
    assert record["reason"] == "decoded data for 1 rank(s) of this node 141 KiB > 105 KiB (data.memory_budget_gb)"
    big = cfg_for(tmp_path / "big", folder, "fedavg", "auto")
    fit(big)
    record = json.loads((Path(big.run_dir) / "data.json").read_text())
    assert record["storage"] == "memory" and "half of the available memory" in record["reason"]
    fault_scenarios.assert_same_run(small.run_dir, big.run_dir)
    assert t.data.misses == 0


def test_stream_refused_for_sources_read_whole(tmp_path):
    with pytest.raises(ConfigError, match="only imagefolder and npy are read lazily"):
        base_config(tmp_path, data={"storage": "stream"})


def cli(cfg_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_gradalign", "train", str(cfg_path), *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("storage", ["memory", "stream"])
def test_corrupt_image_named_exit_2_or_skipped(tmp_path, storage):
    root = make_folder(tmp_path / "tree")
    bad = root / "train" / "class2" / "005.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    cfg = cfg_for(tmp_path, root, "fedavg", storage)
    cfg.algorithm.local_batch_size, cfg.train.clients_per_round = "full", 5  # round 1 reads every image
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg.to_dict()))
    proc = cli(path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot decode image {bad}" in proc.stderr and "data.on_corrupt=skip" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli(path, "data.on_corrupt=skip", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((Path(cfg.run_dir) / "data.json").read_text())
    assert record["skipped"] == [str(bad)]
    shards = json.loads((Path(cfg.run_dir) / "partition.json").read_text())["clients"].values()
    val = json.loads((Path(cfg.run_dir) / "val_indices.json").read_text())["indices"]
    assert sum(map(len, shards)) + len(val) == 4 * 24 - 1


def test_skip_gives_the_same_run_in_both_modes(tmp_path):
    root = make_folder(tmp_path / "tree")
    (root / "test" / "class1" / "002.png").write_bytes(b"not a png")
    runs = []
    for storage in ("memory", "stream"):
        cfg = cfg_for(tmp_path, root, "fedga", storage)
        cfg.data.on_corrupt = "skip"
        runs.append(fit(cfg).cfg.run_dir)
    fault_scenarios.assert_same_run(*runs)


def test_empty_class_folder_is_named(tmp_path):
    root = make_folder(tmp_path / "tree", classes=2)
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"class folder\(s\) train/zebra hold no .jpg"):
        Trainer(cfg_for(tmp_path, root, "fedavg", "stream"))


def test_wrong_size_image_in_stream_mode_is_named(tmp_path):
    root = make_folder(tmp_path / "tree")
    odd = root / "train" / "class3" / "001.png"
    Image.new("RGB", (12, 10)).save(odd)
    with pytest.raises(DataError, match=f"image {odd} is 12x10 but the first image is 10x10"):
        fit(cfg_for(tmp_path, root, "fedavg", "stream"))


def test_convert_to_npy_then_stream_equals_the_folder(tmp_path, folder):
    out = tmp_path / "npy"
    proc = subprocess.run([sys.executable, "-m", "dist_gradalign.data.convert", "--source", "imagefolder",
                           "--root", str(folder), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"data.source=npy data.root={out}" in proc.stdout
    x = np.load(out / "x_train.npy", mmap_mode="r")
    assert x.dtype == np.uint8 and x.shape == (96, 3, 10, 10)
    images = fit(cfg_for(tmp_path / "folder", folder, "fedavg", "memory"))
    cfg = cfg_for(tmp_path / "arrays", out, "fedavg", "stream", source="npy")
    cfg.data.augment = "crop_flip"  # uint8 image arrays augment as the folder's images do
    arrays = fit(cfg)
    fault_scenarios.assert_same_run(images.cfg.run_dir, arrays.cfg.run_dir)
    proc = subprocess.run([sys.executable, "-m", "dist_gradalign.data.convert", "--source", "npz",
                           "--root", str(tmp_path / "none.npz"), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "none.npz" in proc.stderr and "Traceback" not in proc.stderr


def test_memory_that_cannot_fit_is_refused_before_decoding(tmp_path, folder):
    cfg = cfg_for(tmp_path, folder, "fedavg", "memory")
    cfg.data.memory_budget_gb = 1e-4
    with pytest.raises(DataError, match=r"data.storage = memory would hold 141 KiB of decoded imagefolder data for "
                                        r"1 rank\(s\) of this node, more than 105 KiB \(data.memory_budget_gb\): "
                                        r"set data.storage=stream"):
        Trainer(cfg)


def test_streamed_non_finite_sample_is_named(tmp_path):
    root = tmp_path / "arrays"
    root.mkdir()
    x = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    x[37, 2] = np.nan
    y = np.arange(60) % 2
    for k, v in {"x_train": x[:50], "y_train": y[:50], "x_test": x[50:], "y_test": y[50:]}.items():
        np.save(root / f"{k}.npy", v)
    cfg = cfg_for(tmp_path, root, "fedavg", "stream", source="npy")
    cfg.algorithm.local_batch_size, cfg.train.clients_per_round = "full", 5
    with pytest.raises(DataError, match=r"streamed data: x_train holds non-finite values \(1 of \d+ samples; the "
                                        r"first is sample 37, with NaN\)"):
        fit(cfg)


@pytest.mark.parametrize("control", ["per_round", "stateful"])
def test_a_rank_plans_reads_of_its_own_clients_only(tmp_path, folder, control):
    """Rank 1 of 2 (collectives are identities here): every planned read lies in the shards of
    the clients rank 1 runs that round (by position; with stateful SCAFFOLD, the clients it
    owns), and evaluation reads rank 1's slices only."""
    from dist_gradalign.backend import Backend

    cfg = cfg_for(tmp_path, folder, "scaffold", "stream")
    cfg.algorithm.control = control
    t = Trainer(cfg, Backend(rank=1, world_size=2))
    checked = 0
    for rnd in range(1, 5):
        clients = t.round_clients(rnd)
        mine = t.backend.owned(clients) if control == "stateful" else t.backend.assigned(clients)
        if not mine:
            continue
        checked += 1
        allowed = np.concatenate([t.shards_np[c] for c in mine])
        reads = torch.cat([r.reshape(-1) for r in t._reads(rnd)]).numpy()
        assert len(reads) and np.isin(reads, allowed).all()
        others = np.concatenate([t.shards_np[c] for c in t.round_clients(rnd) if c not in mine])
        assert not np.isin(reads, others).any()
    assert checked >= 3
    assert t.data.eval_idx["test"][1].tolist() == list(range(1, 24, 2))
    assert t.data.eval_idx["val"][1].tolist() == t.val_np[1::2].tolist()
