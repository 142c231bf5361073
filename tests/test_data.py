"""Dataset sources (digits, npz, imagefolder, torchvision) and batch augmentation."""
from __future__ import annotations

import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_gradalign.config import ConfigError, DataConfig
from dist_gradalign.data import DataError, Dataset, augment_batch, load_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EMNIST47 = SHARED_DATA / "emnist47" / "emnist47.npz"
CIFAR10_ZIP = SHARED_DATA / "cifar10" / "cifar10-jpeg-q75.zip"


def write_npz(path: Path, **arrays) -> str:
    rng = np.random.default_rng(0)
    default = {"x_train": rng.integers(0, 256, (6, 4, 4), dtype=np.uint8), "y_train": np.arange(6) % 3,
               "x_test": rng.integers(0, 256, (2, 4, 4), dtype=np.uint8), "y_test": np.array([0, 1])}
    default.update(arrays)
    np.savez(path, **{k: v for k, v in default.items() if v is not None})
    return str(path)


# ------------------------------------------------------------------------ digits

def test_digits_shapes_and_split():
    from sklearn.datasets import load_digits

    ds = load_dataset(DataConfig(source="digits"))
    assert isinstance(ds, Dataset) and ds.name == "digits" and ds.num_classes == 10
    assert ds.x_train.shape == (1497, 1, 8, 8) and ds.x_test.shape == (300, 1, 8, 8)
    assert ds.input_shape == (1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1
    raw = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), raw.images[perm[-300:]] / 16, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train.numpy(), raw.target[perm[:-300]])


def test_digits_normalize_only_when_set():
    plain = load_dataset(DataConfig(source="digits"))
    norm = load_dataset(DataConfig(source="digits", normalize=[0.5, 0.25]))
    torch.testing.assert_close(norm.x_train, (plain.x_train - 0.5) / 0.25)


# ------------------------------------------------------------------------ npz

def test_npz_uint8_scaled_and_normalized(tmp_path):
    x = np.array([[[0, 51], [102, 255]]], dtype=np.uint8).repeat(2, axis=0)
    path = write_npz(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 2]), x_test=x, y_test=np.array([1, 4]))
    ds = load_dataset(DataConfig(source="npz", root=path))
    assert ds.x_train.shape == (2, 1, 2, 2) and ds.num_classes == 5 and ds.name == "npz"
    torch.testing.assert_close(ds.x_train[0, 0], torch.tensor([[0.0, 0.2], [0.4, 1.0]]))
    ds = load_dataset(DataConfig(source="npz", root=path, normalize=[[0.5], [0.25]]))
    torch.testing.assert_close(ds.x_test[1, 0], torch.tensor([[-2.0, -1.2], [-0.4, 2.0]]))


def test_npz_channels_last_and_per_channel_normalize(tmp_path):
    x = np.zeros((3, 5, 4, 3), dtype=np.uint8)
    x[..., 1], x[..., 2] = 51, 255
    path = write_npz(tmp_path / "d.npz", x_train=x, y_train=np.zeros(3, int), x_test=x[:1], y_test=np.zeros(1, int))
    ds = load_dataset(DataConfig(source="npz", root=path, normalize=[[0.0, 0.2, 0.5], [1.0, 0.5, 0.25]]))
    assert ds.input_shape == (3, 5, 4)
    for c, value in enumerate([0.0, 0.0, 2.0]):
        assert torch.equal(ds.x_train[:, c], torch.full((3, 5, 4), value))


def test_npz_channels_first_kept(tmp_path):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    path = write_npz(tmp_path / "d.npz", x_train=x, y_train=np.zeros(2, int), x_test=x, y_test=np.zeros(2, int))
    ds = load_dataset(DataConfig(source="npz", root=path))
    torch.testing.assert_close(ds.x_train, torch.from_numpy(x).float() / 255)


def test_npz_float_used_as_stored(tmp_path):
    x = np.random.default_rng(1).normal(size=(4, 2, 5, 6)).astype(np.float32) * 7
    path = write_npz(tmp_path / "d.npz", x_train=x, y_train=np.arange(4), x_test=x[:2], y_test=np.arange(2))
    ds = load_dataset(DataConfig(source="npz", root=path, normalize=[0.5, 0.5]))
    assert torch.equal(ds.x_train, torch.from_numpy(x)) and ds.x_train.dtype == torch.float32
    assert ds.num_classes == 4


def test_normalize_channel_mismatch_is_config_error(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    with pytest.raises(ConfigError, match="data.normalize"):
        load_dataset(DataConfig(source="npz", root=path, normalize=[[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))


@pytest.mark.parametrize("arrays, message", [
    ({"y_test": None}, "lacks y_test"),
    ({"x_train": np.zeros((6,), np.uint8)}, "x_train has shape (6,), expected 2 (feature vectors), 3 or 4"),
    ({"x_train": np.zeros((6, 16), np.uint8)}, "one train input has shape (16,) but one test input (1, 4, 4)"),
    ({"y_train": np.arange(5)}, "6 samples but y_train has 5"),
    ({"x_test": np.zeros((2, 4, 4), np.int32)}, "dtype int32"),
    ({"y_test": np.array([0.0, 1.0])}, "integer labels"),
    ({"x_test": np.zeros((2, 5, 5), np.uint8)}, "shape"),
])
def test_npz_bad_contents(tmp_path, arrays, message):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(source="npz", root=path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_npz_missing_or_corrupt_file(tmp_path):
    with pytest.raises(DataError, match="not found.*x_train"):
        load_dataset(DataConfig(source="npz", root=str(tmp_path / "nope.npz")))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cannot be read"):
        load_dataset(DataConfig(source="npz", root=str(junk)))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load_dataset(DataConfig(source="npz", root=str(single)))


# ------------------------------------------------------------------------ npz feature vectors and bad values

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_npz_feature_vectors_kept_as_n_by_d(tmp_path, dtype):
    x = np.random.default_rng(2).normal(size=(5, 7)).astype(dtype) * 3
    path = write_npz(tmp_path / "f.npz", x_train=x, y_train=np.arange(5) % 2, x_test=x[:3], y_test=np.arange(3) % 2)
    ds = load_dataset(DataConfig(source="npz", root=path, normalize=[1.0, 2.0]))
    assert ds.x_train.shape == (5, 7) and ds.x_test.shape == (3, 7) and ds.input_shape == (7,)
    assert ds.x_train.dtype == torch.float32
    torch.testing.assert_close(ds.x_train, torch.from_numpy(x.astype(np.float32)))  # float: used as stored


def test_npz_uint8_feature_vectors_scaled_and_normalized_per_feature(tmp_path):
    x = np.array([[0, 51, 255], [255, 102, 0]], dtype=np.uint8)
    path = write_npz(tmp_path / "f.npz", x_train=x, y_train=np.array([0, 1]), x_test=x, y_test=np.array([1, 0]))
    ds = load_dataset(DataConfig(source="npz", root=path))
    torch.testing.assert_close(ds.x_train, torch.tensor([[0.0, 0.2, 1.0], [1.0, 0.4, 0.0]]))
    ds = load_dataset(DataConfig(source="npz", root=path, normalize=[[0.0, 0.2, 0.5], [1.0, 0.1, 0.25]]))
    torch.testing.assert_close(ds.x_test, torch.tensor([[0.0, 0.0, 2.0], [1.0, 2.0, -2.0]]))
    with pytest.raises(ConfigError, match=r"does not fit the feature vectors: a per-feature list must have 3 "):
        load_dataset(DataConfig(source="npz", root=path, normalize=[[0.5], [0.5]]))


def test_npz_feature_vectors_refuse_crop_flip(tmp_path):
    x = np.zeros((4, 6), np.float32)
    path = write_npz(tmp_path / "f.npz", x_train=x, y_train=np.arange(4), x_test=x, y_test=np.arange(4))
    with pytest.raises(ConfigError, match=r"data.augment = 'crop_flip' is not allowed for feature vectors "
                                          r"\(x_train of shape \(4, 6\)\).*data.augment=none"):
        load_dataset(DataConfig(source="npz", root=path, augment="crop_flip"))


@pytest.mark.parametrize("split, bad, value, name", [
    ("x_train", 3, np.nan, "NaN"), ("x_test", 1, np.inf, "inf"), ("x_train", 0, -np.inf, "inf")])
@pytest.mark.parametrize("shape", [(6, 4, 4), (6, 5)])
def test_npz_non_finite_values_name_array_and_first_sample(tmp_path, split, bad, value, name, shape):
    xs = {k: np.random.default_rng(3).normal(size=shape).astype(np.float32) for k in ("x_train", "x_test")}
    xs[split][bad].flat[2] = value
    xs[split][5].flat[0] = value  # a later bad sample: the first one is named
    path = write_npz(tmp_path / "nan.npz", y_train=np.arange(6) % 3, y_test=np.arange(6) % 3, **xs)
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(source="npz", root=path))
    msg = str(err.value)
    assert f"{split} holds non-finite values (2 of 6 samples; the first is sample {bad}, with {name})" in msg, msg
    assert path in msg


# ------------------------------------------------------------------------ imagefolder

def make_image_tree(root: Path) -> dict[str, np.ndarray]:
    """train/{b_cat,a_dog}, test/{b_cat,a_dog} with known 3x2 pixels; one grayscale PNG."""
    rng = np.random.default_rng(0)
    images = {}
    for split, counts in (("train", {"b_cat": 2, "a_dog": 1}), ("test", {"b_cat": 1, "a_dog": 1})):
        for cls, count in counts.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                name = f"{split}/{cls}/{i}.png"
                pixels = rng.integers(0, 256, (3, 2, 3), dtype=np.uint8)
                if name == "train/b_cat/1.png":
                    pixels = np.repeat(pixels[..., :1], 3, axis=2)
                    Image.fromarray(pixels[..., 0], mode="L").save(root / name)
                else:
                    Image.fromarray(pixels).save(root / name)
                images[name] = pixels
    (root / "train" / "a_dog" / "notes.txt").write_text("not an image")
    return images


def check_tiny_tree(ds: Dataset, images: dict[str, np.ndarray]) -> None:
    assert ds.x_train.shape == (3, 3, 3, 2) and ds.x_test.shape == (2, 3, 3, 2) and ds.num_classes == 2
    assert ds.y_train.tolist() == [0, 1, 1] and ds.y_test.tolist() == [0, 1]  # a_dog = 0, b_cat = 1
    order = ["train/a_dog/0.png", "train/b_cat/0.png", "train/b_cat/1.png"]
    expected = np.stack([images[n] for n in order]).transpose(0, 3, 1, 2) / 255
    torch.testing.assert_close(ds.x_train, torch.from_numpy(expected).float())
    expected = np.stack([images[n] for n in ["test/a_dog/0.png", "test/b_cat/0.png"]]).transpose(0, 3, 1, 2)
    torch.testing.assert_close(ds.x_test, torch.from_numpy(expected / 255).float())


def test_imagefolder_directory_and_zip(tmp_path):
    images = make_image_tree(tmp_path / "tree")
    check_tiny_tree(load_dataset(DataConfig(source="imagefolder", root=str(tmp_path / "tree"))), images)
    archive = tmp_path / "tree.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "tree").rglob("*")):
            zf.write(path, path.relative_to(tmp_path / "tree").as_posix())
    check_tiny_tree(load_dataset(DataConfig(source="imagefolder", root=str(archive))), images)


def test_imagefolder_normalize(tmp_path):
    images = make_image_tree(tmp_path)
    ds = load_dataset(DataConfig(source="imagefolder", root=str(tmp_path), normalize=[[0.1, 0.2, 0.3], 0.5]))
    expected = (images["test/a_dog/0.png"].transpose(2, 0, 1) / 255 - np.array([0.1, 0.2, 0.3])[:, None, None]) / 0.5
    torch.testing.assert_close(ds.x_test[0], torch.from_numpy(expected).float())


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*train/<class>"):
        load_dataset(DataConfig(source="imagefolder", root=str(tmp_path / "missing")))
    make_image_tree(tmp_path / "a")
    Image.new("RGB", (5, 5)).save(tmp_path / "a" / "test" / "a_dog" / "big.png")
    with pytest.raises(DataError, match="share one size"):
        load_dataset(DataConfig(source="imagefolder", root=str(tmp_path / "a")))
    (tmp_path / "b" / "train" / "x").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(tmp_path / "b" / "train" / "x" / "0.png")
    with pytest.raises(DataError, match="no images under test/"):
        load_dataset(DataConfig(source="imagefolder", root=str(tmp_path / "b")))
    (tmp_path / "b" / "test" / "y").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(tmp_path / "b" / "test" / "y" / "0.png")
    with pytest.raises(DataError, match="no train/ folder"):
        load_dataset(DataConfig(source="imagefolder", root=str(tmp_path / "b")))
    (tmp_path / "b" / "test" / "y" / "0.png").write_bytes(b"garbage")
    (tmp_path / "b" / "test" / "y").rename(tmp_path / "b" / "test" / "x")
    with pytest.raises(DataError, match="cannot decode"):
        load_dataset(DataConfig(source="imagefolder", root=str(tmp_path / "b")))


# ------------------------------------------------------------------------ torchvision

@pytest.mark.parametrize("source", ["emnist", "cifar10", "cifar100", "mnist", "fashionmnist"])
def test_torchvision_missing_data_says_download(tmp_path, source):
    with pytest.raises(DataError, match="data.download=true") as err:
        load_dataset(DataConfig(source=source, root=str(tmp_path / "empty"), download=False))
    assert str(tmp_path / "empty") in str(err.value)


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("source, raw, names, mean, std", [
    ("mnist", "MNIST", ("train-{}-idx{}-ubyte", "t10k-{}-idx{}-ubyte"), 0.1307, 0.3081),
    ("emnist", "EMNIST", ("emnist-balanced-train-{}-idx{}-ubyte", "emnist-balanced-test-{}-idx{}-ubyte"), 0.5, 0.5),
])
def test_torchvision_raw_arrays_default_normalize(tmp_path, source, raw, names, mean, std):
    rng = np.random.default_rng(0)
    x = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 5), ("test", 3))}
    y = {"train": np.array([0, 1, 2, 46, 3]), "test": np.array([4, 5, 6])}
    for split, name in zip(("train", "test"), names):
        write_idx(tmp_path / raw / "raw" / name.format("images", 3), x[split])
        write_idx(tmp_path / raw / "raw" / name.format("labels", 1), y[split])
    ds = load_dataset(DataConfig(source=source, root=str(tmp_path)))
    assert ds.x_train.shape == (5, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28) and ds.num_classes == 47
    torch.testing.assert_close(ds.x_train[:, 0], (torch.from_numpy(x["train"]).float() / 255 - mean) / std)
    assert ds.y_test.tolist() == [4, 5, 6]


# ------------------------------------------------------------------------ augmentation

def reference_crop_flip(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Per-sample loop with the same random draws as augment_batch."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    dy, dx = torch.randint(0, 9, (b,), generator=g), torch.randint(0, 9, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def test_augment_none_is_identity():
    x = torch.randn(4, 3, 8, 8)
    assert augment_batch(x, "none", torch.Generator().manual_seed(0)) is x


def test_crop_flip_matches_reference_and_is_deterministic():
    x = torch.randn(64, 3, 10, 7)
    a = augment_batch(x, "crop_flip", torch.Generator().manual_seed(3))
    b = augment_batch(x, "crop_flip", torch.Generator().manual_seed(3))
    c = augment_batch(x, "crop_flip", torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.is_contiguous() and a.device == x.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, reference_crop_flip(x, 3))
    changed = (a != x).flatten(1).any(1)
    assert changed.float().mean() > 0.8
    with pytest.raises(ValueError, match="crop_flip"):
        augment_batch(x, "rotate", torch.Generator())


# ------------------------------------------------------------------------ real data

@pytest.mark.skipif(not EMNIST47.is_file(), reason=f"real EMNIST npz not staged at {EMNIST47}")
def test_real_emnist47_npz():
    start = time.perf_counter()
    ds = load_dataset(DataConfig(source="npz", root=str(EMNIST47)))
    print(f"emnist47.npz loaded in {time.perf_counter() - start:.2f} s")
    assert ds.num_classes == 47 and ds.input_shape == (1, 28, 28)
    assert len(ds.y_train) == 28200 and len(ds.y_test) == 7050
    assert np.bincount(ds.y_train.numpy()).tolist() == [600] * 47
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1


@pytest.mark.skipif(not CIFAR10_ZIP.is_file(), reason=f"CIFAR-10 JPEG zip not staged at {CIFAR10_ZIP}")
def test_real_cifar10_jpeg_zip():
    start = time.perf_counter()
    ds = load_dataset(DataConfig(source="imagefolder", root=str(CIFAR10_ZIP),
                                 normalize=[[0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]]))
    print(f"cifar10-jpeg-q75.zip loaded in {time.perf_counter() - start:.2f} s")
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert len(ds.y_train) == 50000 and len(ds.y_test) == 10000
    assert np.bincount(ds.y_train.numpy()).tolist() == [5000] * 10
    means = ds.x_train.mean(dim=(0, 2, 3))
    assert means.abs().max() < 0.01  # the official CIFAR-10 means normalize it to about zero
