"""Feature vectors (N, D) from an npz file: trained by mlp and logreg, refused with one clear
message by the convolutional models and by crop_flip augmentation."""
import numpy as np
import pytest
import yaml

from dist_gradalign.cli import main
from dist_gradalign.engine import Trainer

from util import base_config, run_dir_rows, write_npz

CLASSES, D = 4, 20


def _blobs(path, dtype, n_train=800, n_test=200, seed=0):
    """CLASSES Gaussian blobs in D dimensions whose centres are 6 standard deviations apart along
    orthogonal axes: linearly separable up to a few overlapping samples (chance is 1/CLASSES)."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * np.eye(CLASSES, D)

    def draw(n):
        y = rng.integers(0, CLASSES, n)
        return (centres[y] + rng.normal(size=(n, D))).astype(dtype), y

    (x_train, y_train), (x_test, y_test) = draw(n_train), draw(n_test)
    return write_npz(path, x_train, y_train, x_test, y_test)


@pytest.mark.parametrize("model, dtype, executor", [
    ({"name": "logreg"}, np.float64, "sequential"),
    ({"name": "mlp", "hidden": [32]}, np.float32, "sequential"),
    ({"name": "mlp", "hidden": [32]}, np.float64, "vectorized"),
])
def test_feature_vectors_train_above_chance(tmp_path, model, dtype, executor):
    path = _blobs(tmp_path / "blobs.npz", dtype)
    cfg = base_config(tmp_path, source="npz", root=str(path), model=model,
                      partition={"scheme": "dirichlet", "num_clients": 4, "alpha": 1.0},
                      train={"rounds": 15, "executor": executor, "eval_every": 5})
    summary = Trainer(cfg).fit()
    assert summary["test_acc"] > 0.9, summary  # chance: 0.25
    rows = run_dir_rows(cfg.run_dir)
    assert len(rows) == 15 and rows[-1]["train_loss"] < rows[0]["train_loss"]


def _cli(tmp_path, capsys, path, changes):
    cfg = {"run_dir": str(tmp_path / "run"), "data": {"source": "npz", "root": str(path)},
           "partition": {"num_clients": 2}, "train": {"rounds": 2, "clients_per_round": 2, "progress": False}}
    for k, v in changes.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["train", str(tmp_path / "cfg.yaml")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return code, err


@pytest.mark.parametrize("name", ["cnn_emnist", "cnn_cifar", "resnet18"])
def test_convolutional_model_on_feature_vectors_is_one_config_error(tmp_path, capsys, name):
    path = _blobs(tmp_path / "blobs.npz", np.float32, n_train=40, n_test=10)
    code, err = _cli(tmp_path, capsys, path, {"model": {"name": name}})
    assert code == 2
    assert err.startswith(f"config error: model.name = '{name}' needs images (N, C, H, W), but the data are "
                          f"feature vectors (N, {D}): use model.name = 'mlp' or 'logreg'"), err
    assert not (tmp_path / "run").exists()


def test_crop_flip_on_feature_vectors_is_one_config_error(tmp_path, capsys):
    path = _blobs(tmp_path / "blobs.npz", np.float64, n_train=40, n_test=10)
    code, err = _cli(tmp_path, capsys, path, {"model": {"name": "mlp"}, "data": {"augment": "crop_flip"}})
    assert code == 2
    assert err.startswith("config error: data.augment = 'crop_flip' is not allowed for feature vectors "
                          f"(x_train of shape (40, {D}))"), err
    assert not (tmp_path / "run").exists()
