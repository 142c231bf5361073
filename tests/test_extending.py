"""Bring your own model, data, loss and algorithm (docs/extending.md): the examples' parts and
the parts in tests/user_parts.py get every guarantee the built-ins have. Real process groups
(torchrun, gloo), the real staged CIFAR-10, W&B offline."""
import io
import json
import zipfile
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import torch

import dist_gradalign as dg
from dist_gradalign.backend import Backend
from dist_gradalign.cli import main
from dist_gradalign.engine import Trainer
from test_distributed import torchrun
from test_wandb import read_wandb_log
from util import SHARED_DATA, base_config, load_params, run_dir_rows, write_npz, write_tiny_config

CIFAR_ZIP = SHARED_DATA / "cifar10" / "cifar10-jpeg-q75.zip"
CIFAR_NORM = [[0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]]
WORLDS = (1, 2, 4)


def cifar_subset(path: Path, per_class_train: int = 12, per_class_test: int = 3) -> Path:
    """The first images of each class of the staged CIFAR-10, as an npz (uint8, N, H, W, C)."""
    from PIL import Image

    out = {}
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(z.namelist())
        for split, k in (("train", per_class_train), ("test", per_class_test)):
            classes = sorted({n.split("/")[1] for n in names if n.startswith(split + "/")})
            xs, ys = [], []
            for c, cls in enumerate(classes):
                for n in [n for n in names if n.startswith(f"{split}/{cls}/")][:k]:
                    xs.append(np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")))
                    ys.append(c)
            out[f"x_{split}"], out[f"y_{split}"] = np.stack(xs), np.array(ys)
    return write_npz(path, **out)


def _parts_configs(root: Path, world: int, npz) -> list[dict]:
    """Three user setups (the ResNet-18 one where the staged CIFAR-10 is), each run straight
    (3 rounds) and stopped after 2 then resumed."""
    setups = {
        # (a) torchvision's ResNet-18 with its batch norm, by import path
        "resnet18": {"data": {"source": "npz", "root": str(npz), "normalize": CIFAR_NORM, "augment": "crop_flip"},
                     "partition": {"scheme": "dirichlet", "num_clients": 4, "alpha": 1.0, "min_size": 16},
                     "model": {"name": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}},
                     "algorithm": {"name": "fedga", "lr": 0.05, "beta": 0.1, "local_steps": 2, "local_batch_size": 8,
                                   "full_grad_batch": 8}},
        # (b) a user dataset of token windows, per-token targets, one text per client
        "char_lm": {"data": {"source": "examples.char_lm:sonnets", "kwargs": {"seq_len": 16, "stride": 8},
                             "val_fraction": 0.1},
                    "partition": {"scheme": "by_key", "num_clients": 6},
                    "model": {"name": "examples.char_lm:char_lstm", "kwargs": {"embed": 8, "hidden": 16}},
                    "algorithm": {"name": "gradalign", "lr": 0.5, "beta": 0.2, "local_batch_size": 8}},
        # (c) a user algorithm in one file, with a model that has batch norm
        "local_momentum": {"data": {"source": "digits"}, "partition": {"scheme": "dirichlet", "num_clients": 6},
                           "model": {"name": "user_parts:bn_mlp"},
                           "algorithm": {"name": "examples.local_momentum:LocalMomentum", "kwargs": {"momentum": 0.5},
                                         "lr": 0.1, "local_steps": 3, "local_batch_size": 16}},
    }
    if npz is None:
        del setups["resnet18"]
    out = []
    for name, setup in setups.items():
        for run, rounds in (("straight", 3), ("resumed", 2), ("resumed", 3)):
            cfg = {"seed": 1, "run_dir": str(root / f"w{world}" / name / run), **setup,
                   "train": {"rounds": rounds, "clients_per_round": 4, "eval_every": 1, "progress": False,
                             "precision": "float64", "executor": "sequential", "checkpoint_every": 1}}
            out.append(cfg)
    return out


@pytest.fixture(scope="module")
def user_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_parts")
    npz = cifar_subset(root / "cifar-subset.npz") if CIFAR_ZIP.is_file() else None
    for world in WORLDS:
        spec = root / f"configs{world}.json"
        spec.write_text(json.dumps(_parts_configs(root, world, npz)))
        proc = torchrun(world, "tests/dist_worker.py", str(spec))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("name", ["resnet18", "char_lm", "local_momentum"])
def test_user_parts_agree_across_world_sizes_and_resume_bit_identically(user_runs, name):
    if name == "resnet18" and not CIFAR_ZIP.is_file():
        pytest.skip(f"needs the staged CIFAR-10 ({CIFAR_ZIP})")
    ref = load_params(user_runs / "w1" / name / "straight")
    if name != "char_lm":  # the batch-norm models: their statistics are in model.pt, averaged and moved
        assert any("running_mean" in k for k in ref) and any("num_batches_tracked" in k for k in ref)
    for world in WORLDS:
        straight = load_params(user_runs / f"w{world}" / name / "straight")
        resumed = load_params(user_runs / f"w{world}" / name / "resumed")
        for key in ref:  # a stop and resume changes nothing, buffers included
            assert torch.equal(straight[key], resumed[key]), (name, world, key)
            # float64: only the all-reduce's summation order differs between world sizes
            torch.testing.assert_close(straight[key], ref[key], rtol=1e-8, atol=1e-8, msg=f"{name} {key} world {world}")
        rows = run_dir_rows(user_runs / f"w{world}" / name / "straight")
        ref_rows = run_dir_rows(user_runs / "w1" / name / "straight")
        assert [r["bytes"] for r in rows] == [r["bytes"] for r in ref_rows]
        assert rows[-1]["test_loss"] == pytest.approx(ref_rows[-1]["test_loss"], rel=1e-9)
        assert rows == run_dir_rows(user_runs / f"w{world}" / name / "resumed") or all(
            {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}
            for a, b in zip(rows, run_dir_rows(user_runs / f"w{world}" / name / "resumed")))
    components = json.loads((user_runs / "w2" / name / "straight" / "components.json").read_text())
    assert components["model"] == {"resnet18": "torchvision.models:resnet18", "char_lm": "examples.char_lm:char_lstm",
                                   "local_momentum": "user_parts:bn_mlp"}[name]


def test_float_buffers_are_averaged_with_the_clients_weights_and_counted(tmp_path):
    """One round of FedAvg, two clients of unequal size, full batches: the global running
    statistics are sum_i w_i (client i's statistics after its K steps), derived here by
    training each client's copy by hand; num_batches_tracked counts K; bytes include them."""
    cfg = base_config(tmp_path, model={"name": "user_parts:bn_mlp"},
                      partition={"scheme": "dirichlet", "num_clients": 2, "alpha": 0.3},
                      algorithm={"name": "fedavg", "lr": 0.3, "local_steps": 3, "local_batch_size": "full"},
                      train={"rounds": 1, "clients_per_round": 2, "precision": "float64", "executor": "sequential"})
    t = Trainer(cfg)
    start = {k: v.clone() for k, v in t.fm.module.state_dict().items()}
    data = [t.data.gather(torch.as_tensor(s)) for s in t.shards_np]
    t.fit()
    got = torch.load(Path(cfg.run_dir) / "model.pt", weights_only=True)
    from user_parts import BNMLP

    expected, sizes = [], [len(s) for s in t.shards_np]
    for xb, yb in data:
        m = BNMLP(64, 10).double()
        m.load_state_dict(start)
        for _ in range(3):
            m.zero_grad()
            torch.nn.functional.cross_entropy(m(xb), yb).backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.3 * p.grad
        expected.append(m.state_dict())
    w = [n / sum(sizes) for n in sizes]
    for key in ("bn.running_mean", "bn.running_var", "fc1.weight", "bn.weight"):
        want = w[0] * expected[0][key] + w[1] * expected[1][key]
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-12, msg=key)
    assert int(got["bn.num_batches_tracked"]) == 3
    n_params, n_buffers = t.fm.numel, t.fm.buffers.numel()
    assert n_buffers == 16 and run_dir_rows(cfg.run_dir)[0]["bytes"] == (n_params + 4 + n_buffers) * 8


def test_local_momentum_matches_the_hand_derived_update(tmp_path):
    """Example (c) against numpy: one client, full batch, logistic regression from zero,
    v_1 = g(y_0), v_k = m v_{k-1} + g(y_{k-1}), y_k = y_{k-1} - lr v_k."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)).astype(np.float32).astype(np.float64), rng.integers(0, 3, 20)  # npz: float32
    npz = write_npz(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    cfg = base_config(tmp_path, source="npz", root=str(npz), model={"name": "logreg"},
                      partition={"scheme": "iid", "num_clients": 1},
                      algorithm={"name": "examples.local_momentum:LocalMomentum", "kwargs": {"momentum": 0.9},
                                 "lr": 0.5, "local_steps": 3, "local_batch_size": "full"},
                      train={"rounds": 1, "clients_per_round": 1, "precision": "float64"})
    result = dg.fit(cfg)
    W, b, v = np.zeros((3, 3)), np.zeros(3), None
    onehot = np.eye(3)[y]
    for _ in range(3):
        z = x @ W.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = np.concatenate([((p - onehot).T @ x / 20).ravel(), (p - onehot).mean(0)])
        v = g if v is None else 0.9 * v + g
        W, b = W - 0.5 * v[:9].reshape(3, 3), b - 0.5 * v[9:]
    lin = result.model.linear
    np.testing.assert_allclose(lin.weight.detach().numpy(), W, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lin.bias.detach().numpy(), b, rtol=0, atol=1e-12)
    assert result.metrics[-1]["round"] == 1 and result.summary["algorithm"] == "examples.local_momentum:LocalMomentum"


def test_fit_takes_objects_and_returns_parameters_and_rows(tmp_path):
    """Python objects in place of the config's names: a module, a (train, test) pair, a loss
    function without accuracy (float targets: regression), partitioned iid."""
    import user_parts

    cfg = base_config(tmp_path, train={"rounds": 3, "eval_every": 1})
    module = user_parts.linear_1((5,))
    result = dg.fit(cfg, model=module, data=user_parts.regression(), loss=user_parts.squared_error)
    assert result.model is module and len(result.metrics) == 3
    assert all("test_loss" in r and "test_acc" not in r for r in result.metrics)
    assert result.metrics[-1]["test_loss"] < result.metrics[0]["test_loss"]
    assert load_params(cfg.run_dir)["1.weight"].equal(module[1].weight.detach())
    comp = json.loads((Path(cfg.run_dir) / "components.json").read_text())
    assert comp == {"model": "torch.nn.modules.container:Sequential", "data": "(user_parts:Pairs, user_parts:Pairs)",
                    "loss": "user_parts:squared_error", "algorithm": "fedavg"}


def test_user_dataset_streams_bitwise_as_in_memory_and_a_rank_reads_its_own_clients(tmp_path):
    def cfg(storage, sub):
        return base_config(tmp_path / sub, data={"source": "examples.char_lm:sonnets", "storage": storage,
                                                 "kwargs": {"seq_len": 16, "stride": 8}, "workers": 1},
                           partition={"scheme": "by_key", "num_clients": 6},
                           model={"name": "examples.char_lm:char_lstm", "kwargs": {"embed": 8, "hidden": 16}},
                           algorithm={"name": "fedga", "lr": 0.5, "beta": 0.1, "local_batch_size": 8},
                           train={"rounds": 3, "clients_per_round": 3, "eval_every": 3})
    a, b = dg.fit(cfg("memory", "m")), dg.fit(cfg("stream", "s"))
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    t = Trainer(cfg("stream", "r1"), Backend(rank=1, world_size=2))
    assert t.data_record["storage"] == "stream"
    for rnd in (1, 2, 3):
        mine = t.backend.assigned(t.round_clients(rnd))
        reads = torch.cat([r.reshape(-1) for r in t._reads(rnd)]).numpy()
        assert np.isin(reads, np.concatenate([t.shards_np[c] for c in mine])).all()
    keys = t.data.readers["train"].split.keys
    assert sorted(len(set(keys[s])) for s in t.shards_np) == [1] * 6  # one text per client


def test_wandb_and_report_work_with_user_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = base_config(tmp_path, model={"name": "user_parts:bn_mlp"},
                      algorithm={"name": "examples.local_momentum:LocalMomentum", "lr": 0.1},
                      train={"rounds": 3, "eval_every": 1},
                      logging={"wandb": {"enabled": True, "mode": "offline", "project": "test"}})
    dg.fit(cfg)
    log = read_wandb_log(Path(cfg.run_dir))
    assert [r["round"] for r in log["history"]] == [1, 2, 3]
    from dist_gradalign.report import report

    out = report([cfg.run_dir], str(tmp_path / "report"))
    assert "examples.local_momentum:LocalMomentum" in Path(out["table"]).read_text() and out["plots"]


BAD = {  # override -> what the one config error line says
    "model.name=no_such_pkg.nets:resnet": "model.name = 'no_such_pkg.nets:resnet': no module named 'no_such_pkg'",
    "model.name=examples.char_lm:char_lstmm": "'examples.char_lm' has no attribute 'char_lstmm' (did you mean "
                                              "'char_lstm'?)",
    "model.name=user_parts:raises": "model.name = 'user_parts:raises': calling it with () raised ValueError: "
                                    "width 3 is too narrow",
    "model.name=user_parts:not_a_module": "model.name = 'user_parts:not_a_module' returned a str, not a "
                                          "torch.nn.Module",
    "algorithm.name=user_parts:BNMLP": "algorithm.name = 'user_parts:BNMLP' is not a subclass of "
                                       "dist_gradalign.algorithms.Algorithm",
    "data.source=user_parts:bad_items": "data.source = 'user_parts:bad_items': item 0 of its train dataset is a "
                                        "Tensor: expected a pair (input, target)",
    "model.loss=user_parts:mean_loss": "model.loss = 'user_parts:mean_loss' returned () for a batch of 2: it must "
                                       "return one loss per sample",
    "model.name=user_parts:tied": "parameter 'b.weight' is the same tensor as 'a.weight' (tied parameters",
    "model.name=examples.char_lm:char_lstm": "model.name = 'examples.char_lm:char_lstm': its forward pass on a batch "
                                             "of training inputs (2, 1, 8, 8) (torch.float32) from data.source = "
                                             "'digits' raised",
    "partition.scheme=dirichlet data.source=user_parts:regression": "partition.scheme = 'dirichlet' needs class-id "
                                                                    "targets or partition keys",
}


@pytest.mark.parametrize("override", list(BAD))
def test_a_bad_part_is_one_config_error_line_exit_2_before_training(tmp_path, override):
    path = write_tiny_config(tmp_path)
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["train", str(path), *override.split()])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("config error: "), err.getvalue()
    assert BAD[override] in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_script_calling_fit_runs_on_every_rank_under_torchrun(tmp_path):
    """examples/fit_api.py: the parts as Python objects, the same script on both ranks, fit
    creating the process group; rank 0 prints what fit returned."""
    proc = torchrun(2, "examples/fit_api.py", str(tmp_path / "run"), "train.rounds=4", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fit_api: 4 rounds") == 1, proc.stdout
    comp = json.loads((tmp_path / "run" / "components.json").read_text())
    assert comp["algorithm"] == "local_momentum:LocalMomentum" and comp["model"] == "char_lm:CharLSTM"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["algorithm"] == "local_momentum:LocalMomentum"


@pytest.mark.parametrize("example", ["resnet18_bn", "char_lm", "local_momentum"])
def test_examples_run_under_torchrun(tmp_path, example):
    if example == "resnet18_bn" and not CIFAR_ZIP.is_file():
        pytest.skip(f"needs the staged CIFAR-10 ({CIFAR_ZIP})")
    small = {"resnet18_bn": ["train.rounds=2", "train.clients_per_round=2", "algorithm.local_steps=1",
                             "algorithm.full_grad_batch=16", "train.eval_every=2"],
             "char_lm": ["train.rounds=4", "train.eval_every=2"],
             "local_momentum": ["train.rounds=4", "train.eval_every=2"]}[example]
    proc = torchrun(2, "-m", "dist_gradalign", "train", f"examples/{example}.yaml", f"run_dir={tmp_path}/run",
                    "train.progress=false", *small, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rounds = int(small[0].split("=")[1])
    assert summary["round"] == rounds and np.isfinite(summary["test_loss"]) and summary["test_acc"] > 0
