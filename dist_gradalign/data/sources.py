"""Datasets, loaded whole into memory as float tensors.

Every source ends up as a :class:`Dataset`: images ``(N, C, H, W)`` (or feature vectors
``(N, D)`` from an ``npz`` file) float32, already scaled to [0, 1] and normalized, labels int64;
non-finite inputs are refused. Sources (``data.source``):

- ``emnist`` (split "balanced", 47 classes), ``cifar10``, ``cifar100``, ``mnist``,
  ``fashionmnist``: torchvision datasets under ``data.root`` (fetched when ``data.download``).
  EMNIST images keep torchvision's raw (transposed) orientation.
- ``npz``: ``data.root`` is a ``.npz`` file with ``x_train, y_train, x_test, y_test``; images
  ``(N, H, W)``, ``(N, C, H, W)``, or ``(N, H, W, C)`` (taken as channels-last when the last axis
  is 1 or 3 and the second is not); or feature vectors ``(N, D)`` (tabular data, precomputed
  embeddings) for ``mlp`` and ``logreg``, normalized per feature where images are per channel,
  never augmented.
- ``imagefolder``: ``data.root`` is a directory or a ``.zip`` holding
  ``train/<class>/*.{jpg,jpeg,png}`` and ``test/<class>/*``.
- ``digits``: scikit-learn's bundled 8x8 digits (no download), 1497 train / 300 test; needs the
  ``digits`` extra (scikit-learn).

``data.normalize = [mean, std]`` (numbers or per-channel lists) overrides the source's default
normalization (see :data:`DEFAULT_NORMALIZE`; sources not listed there are normalized only
when it is set).
"""
from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..config import ConfigError, DataConfig

Number = Union[int, float]
Normalize = Sequence[Union[Number, Sequence[Number]]]

#: (mean, std) per channel applied when ``data.normalize`` is null.
DEFAULT_NORMALIZE: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "emnist": ((0.5,), (0.5,)),  # the paper
    "mnist": ((0.1307,), (0.3081,)),
    "fashionmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # the paper
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


class DataError(RuntimeError):
    """Data is missing or malformed; the message says where it was looked for and how to fix it."""


@dataclass
class Dataset:
    """A train/test pair held in memory.

    ``x_*`` are float32 ``(N, C, H, W)`` images or ``(N, D)`` feature vectors (scaled and
    normalized), ``y_*`` are int64 ``(N,)``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input: ``(C, H, W)`` for an image, ``(D,)`` for a feature vector."""
        return tuple(self.x_train.shape[1:])


# Arrays as the loaders return them: (x_train, y_train, x_test, y_test), x in NCHW (or ND).
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.source`` into memory, scaled to [0, 1] and normalized.

    uint8 images are divided by 255 and then normalized with ``cfg.normalize`` (or the
    source's default). Float images from an ``npz`` file are used exactly as stored (cast to
    float32): neither scaled nor normalized, even if ``cfg.normalize`` is set. ``digits`` (values 0..16) is
    divided by 16 and normalized only if ``cfg.normalize`` is set.

    Feature vectors ``(N, D)`` are treated as one channel per feature (``cfg.normalize`` lists
    then hold one entry per feature).

    Raises :class:`DataError` when the data is missing, malformed or not finite (NaN or inf,
    naming the array and the first bad sample) and :class:`~dist_gradalign.config.ConfigError`
    when ``cfg.normalize`` does not fit the images or ``cfg.augment`` is set for feature vectors.
    """
    source = cfg.source
    if source in _TORCHVISION:
        arrays = _load_torchvision(cfg)
    elif source == "npz":
        arrays = _load_npz(Path(cfg.root))
    elif source == "imagefolder":
        arrays = _load_imagefolder(Path(cfg.root))
    elif source == "digits":
        arrays = _load_digits()
    else:
        raise ConfigError(f"data.source = {source!r} is not allowed: choose one of "
                          + ", ".join([*_TORCHVISION, "npz", "imagefolder", "digits"]))
    x_train, y_train, x_test, y_test = arrays
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{source} data at {cfg.root!r}: one train input has shape {x_train.shape[1:]} "
                        f"but one test input {x_test.shape[1:]}; both splits must share one input shape")
    if x_train.ndim == 2 and cfg.augment != "none":
        raise ConfigError(f"data.augment = {cfg.augment!r} is not allowed for feature vectors (x_train of shape "
                          f"{x_train.shape}): it crops and flips images; set data.augment=none")
    norm = cfg.normalize if cfg.normalize is not None else DEFAULT_NORMALIZE.get(source)
    if source == "npz" and x_train.dtype != np.uint8:
        norm = None  # float npz arrays are used exactly as stored
    xs = {}
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        xs[name] = t = _to_float(x, norm)
        bad = ~torch.isfinite(t.flatten(1)).all(1)
        if bad.any():
            i = int(bad.nonzero()[0])
            what = "NaN" if torch.isnan(t[i]).any() else "inf"
            raise DataError(f"{source} data at {cfg.root!r}: {name} holds non-finite values ({int(bad.sum())} of "
                            f"{len(t)} samples; the first is sample {i}, with {what}); remove or repair those "
                            "samples (training on them would only diverge)")
    return Dataset(
        x_train=xs["x_train"],
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=xs["x_test"],
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1,
        name=source,
    )


def _to_float(x: np.ndarray, norm: Optional[Normalize]) -> torch.Tensor:
    """uint8 -> float32 / 255; float -> float32 unchanged; then (x - mean) / std per channel."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.float().div_(255) if t.dtype == torch.uint8 else t.to(torch.float32)
    if norm is None:
        return t
    mean, std = (_per_channel(v, t, norm) for v in norm)
    return t.sub_(mean).div_(std)


def _per_channel(value: Union[Number, Sequence[Number]], t: torch.Tensor, norm: Normalize) -> torch.Tensor:
    """``value`` broadcast over ``t``'s axis 1: channels of images, features of feature vectors."""
    channels = t.shape[1]
    values = list(value) if isinstance(value, (list, tuple)) else [value] * channels
    if len(values) != channels:
        kind = ("feature vectors", "feature") if t.ndim == 2 else ("images", "channel")
        raise ConfigError(f"data.normalize = {list(norm)!r} does not fit the {kind[0]}: a per-{kind[1]} list "
                          f"must have {channels} entries (one per {kind[1]}), got {len(values)}")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, *[1] * (t.ndim - 2))


# ------------------------------------------------------------------------ torchvision

_TORCHVISION: dict[str, tuple[str, dict]] = {
    "emnist": ("EMNIST", {"split": "balanced"}),
    "cifar10": ("CIFAR10", {}),
    "cifar100": ("CIFAR100", {}),
    "mnist": ("MNIST", {}),
    "fashionmnist": ("FashionMNIST", {}),
}


def _load_torchvision(cfg: DataConfig) -> Arrays:
    """Read a torchvision dataset's raw ``.data``/``.targets`` arrays (no per-item transforms)."""
    from torchvision import datasets

    cls_name, kwargs = _TORCHVISION[cfg.source]
    cls = getattr(datasets, cls_name)
    out = []
    for train in (True, False):
        try:
            ds = cls(root=cfg.root, train=train, download=cfg.download, **kwargs)
        except (RuntimeError, OSError) as e:
            if cfg.download:
                hint = ("downloading it failed; download it on a machine with internet access "
                        "(data.download=true) and copy the folder here")
            else:
                hint = ("set data.download=true on a machine with internet access to fetch it, "
                        "or copy torchvision's files there")
            raise DataError(f"{cfg.source} ({cls_name}) not found under data.root = {cfg.root!r}: "
                            f"{hint} ({e})") from e
        x = np.asarray(ds.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # NHW (MNIST-like) or NHWC (CIFAR)
        out += [x, np.asarray(ds.targets, dtype=np.int64)]
    return out[0], out[1], out[2], out[3]


# ------------------------------------------------------------------------ npz

def _load_npz(path: Path) -> Arrays:
    """Read and check ``x_train, y_train, x_test, y_test`` from an ``.npz`` file."""
    need = ("it must be an .npz file with arrays x_train (N,H,W), (N,H,W,C) or (N,C,H,W) images, or (N,D) "
            "feature vectors, uint8 or float, y_train (N,) integer labels, and x_test, y_test likewise")
    if not path.is_file():
        raise DataError(f"npz file {str(path)!r} (data.root) not found: {need}")
    try:
        f = np.load(path, allow_pickle=False)
    except _READ_ERRORS as e:
        raise DataError(f"npz file {str(path)!r} cannot be read ({e}): {need}") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise DataError(f"npz file {str(path)!r} holds a single array, not named arrays: {need}")
    with f:
        missing = [k for k in NPZ_KEYS if k not in f.files]
        if missing:
            raise DataError(f"npz file {str(path)!r} lacks {', '.join(missing)} (it has: "
                            f"{', '.join(f.files) or 'nothing'}): {need}")
        try:
            arrays = {k: f[k] for k in NPZ_KEYS}
        except _READ_ERRORS as e:
            raise DataError(f"npz file {str(path)!r} cannot be read ({e}): {need}") from e

    def problem(msg: str) -> DataError:
        return DataError(f"npz file {str(path)!r}: {msg}; {need}")

    for split in SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # channels last -> channels first
        elif x.ndim not in (2, 4):  # 2: (N, D) feature vectors, kept as they are
            raise problem(f"x_{split} has shape {x.shape}, expected 2 (feature vectors), 3 or 4 (images) dimensions")
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise problem(f"x_{split} has dtype {x.dtype}, expected uint8 or float")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise problem(f"y_{split} has shape {y.shape} and dtype {y.dtype}, expected 1-d integer labels")
        if len(y) != len(x):
            raise problem(f"x_{split} has {len(x)} samples but y_{split} has {len(y)} labels")
        if len(y) and y.min() < 0:
            raise problem(f"y_{split} holds negative labels")
        arrays[f"x_{split}"] = x
    if arrays["x_train"].dtype != arrays["x_test"].dtype:
        raise problem(f"x_train is {arrays['x_train'].dtype} but x_test is {arrays['x_test'].dtype}")
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


# ------------------------------------------------------------------------ image folder

# An image found in the folder or zip: (class name, display name, key passed to the reader).
_Item = tuple[str, str, object]


def _load_imagefolder(root: Path) -> Arrays:
    """Decode ``train/<class>/*`` and ``test/<class>/*`` from a directory or a zip (not extracted)."""
    if root.is_dir():
        files = [(p.relative_to(root).parts, str(p), p)
                 for split in SPLITS if (root / split).is_dir()
                 for p in (root / split).rglob("*") if p.is_file()]
        return _decode_splits(root, files, Path.read_bytes)
    if root.is_file() and zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as zf:
            files = [(tuple(i.filename.split("/")), f"{root}:{i.filename}", i)
                     for i in zf.infolist() if not i.is_dir()]
            return _decode_splits(root, files, zf.read)
    raise DataError(f"image folder {str(root)!r} (data.root) not found or not a directory/.zip file: it must "
                    "hold train/<class>/*.jpg|jpeg|png and test/<class>/* images")


def _decode_splits(root: Path, files: list[tuple[tuple[str, ...], str, object]],
                   read: Callable[[object], bytes]) -> Arrays:
    items: dict[str, list[_Item]] = {s: [] for s in SPLITS}
    for parts, name, key in files:
        if len(parts) == 3 and parts[0] in items and parts[2].lower().endswith(IMAGE_SUFFIXES):
            items[parts[0]].append((parts[1], name, key))
    for split, found in items.items():
        if not found:
            raise DataError(f"image folder {str(root)!r}: no images under {split}/<class>/; it must hold "
                            "train/<class>/*.jpg|jpeg|png and test/<class>/* images")
        found.sort(key=lambda it: (it[0], it[1]))
    classes = sorted({cls for cls, _, _ in items["train"]})
    index = {cls: i for i, cls in enumerate(classes)}
    unknown = sorted({cls for cls, _, _ in items["test"]} - set(classes))
    if unknown:
        raise DataError(f"image folder {str(root)!r}: test classes {unknown} have no train/ folder")
    out = []
    for split in SPLITS:
        out += [_decode_images(items[split], read),
                np.array([index[cls] for cls, _, _ in items[split]], dtype=np.int64)]
    return out[0], out[1], out[2], out[3]


def _decode_images(items: list[_Item], read: Callable[[object], bytes]) -> np.ndarray:
    """Decode images to RGB into one preallocated uint8 (N, 3, H, W) array; all must share a size."""
    from PIL import Image

    out: Optional[np.ndarray] = None
    for i, (_, name, key) in enumerate(items):
        try:
            with Image.open(io.BytesIO(read(key))) as im:
                pixels = np.asarray(im.convert("RGB"))
        except _READ_ERRORS as e:
            raise DataError(f"cannot decode image {name}: {e}") from e
        if out is None:
            out = np.empty((len(items), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != out.shape[1:]:
            raise DataError(f"image {name} is {pixels.shape[1]}x{pixels.shape[0]} but the first image is "
                            f"{out.shape[2]}x{out.shape[1]}; all images must share one size")
        out[i] = pixels
    assert out is not None
    return out.transpose(0, 3, 1, 2)


# ------------------------------------------------------------------------ digits

def _load_digits() -> Arrays:
    """scikit-learn's 8x8 digits / 16, split by a fixed permutation: the last 300 are the test set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # the optional `digits` extra
        raise DataError(f"data.source = 'digits' needs scikit-learn, which cannot be imported here ({e}): "
                        "pip install 'dist-gradalign[digits]' (or pip install scikit-learn)") from None

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    train, test = perm[:-300], perm[-300:]
    return x[train], y[train], x[test], y[test]
