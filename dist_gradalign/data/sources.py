"""Datasets: every source opens as a train and a test :class:`Split`, read by sample index.

A split holds its labels in memory and reads inputs on demand, in the layout the models take:
images ``(B, C, H, W)`` or feature vectors ``(B, D)``, raw (uint8, or float as stored). Two
storage modes (``data.storage``) use the same splits and the same conversion
(:class:`Normalizer`), so they give bitwise the same float inputs:

- ``memory`` (:func:`load_dataset`): read everything once into float32 tensors.
- ``stream`` (:mod:`dist_gradalign.data.stream`): read each batch when it is needed. Only
  ``imagefolder`` (each image decoded from its file) and ``npy`` (arrays opened memory-mapped)
  are lazy; the other sources are arrays in memory already.

Sources (``data.source``):

- ``emnist`` (split "balanced", 47 classes), ``cifar10``, ``cifar100``, ``mnist``,
  ``fashionmnist``: torchvision datasets under ``data.root`` (fetched when ``data.download``).
  EMNIST images keep torchvision's raw (transposed) orientation.
- ``npz``: ``data.root`` is a ``.npz`` file with ``x_train, y_train, x_test, y_test``; images
  ``(N, H, W)``, ``(N, C, H, W)``, or ``(N, H, W, C)`` (taken as channels-last when the last axis
  is 1 or 3 and the second is not); or feature vectors ``(N, D)`` (tabular data, precomputed
  embeddings) for ``mlp`` and ``logreg``, normalized per feature where images are per channel,
  never augmented.
- ``npy``: ``data.root`` is a directory holding the same four arrays as ``x_train.npy``,
  ``y_train.npy``, ``x_test.npy``, ``y_test.npy`` (uncompressed), opened memory-mapped: the
  format for arrays larger than memory (``python -m dist_gradalign.data.convert`` writes it
  from any source).
- ``imagefolder``: ``data.root`` is a directory or a ``.zip`` holding
  ``train/<class>/*.{jpg,jpeg,png}`` and ``test/<class>/*`` (ImageNet's layout); all images
  of one size. A zip's directory of members is held in memory (about 0.5 KB per image): for
  millions of images prefer a directory.
- ``digits``: scikit-learn's bundled 8x8 digits (no download), 1497 train / 300 test; needs the
  ``digits`` extra (scikit-learn).

``data.normalize = [mean, std]`` (numbers or per-channel lists) overrides the source's default
normalization (see :data:`DEFAULT_NORMALIZE`; sources not listed there are normalized only
when it is set).
"""
from __future__ import annotations

import io
import os
import zipfile
import zlib
from dataclasses import dataclass, field
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
    """A train/test pair held in memory (``data.storage: memory``).

    ``x_*`` are float32 ``(N, C, H, W)`` images or ``(N, D)`` feature vectors (scaled and
    normalized), ``y_*`` are int64 ``(N,)``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    skipped: list[str] = field(default_factory=list)  # undecodable images dropped (data.on_corrupt: skip)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input: ``(C, H, W)`` for an image, ``(D,)`` for a feature vector."""
        return tuple(self.x_train.shape[1:])


# ------------------------------------------------------------------------ splits

class Split:
    """One split of a source: ``labels`` (int64, in memory) and ``read(idx)``, the raw inputs of
    the samples ``idx`` as one array ``(B, *input_shape)``."""

    labels: np.ndarray  # the targets, (N, ...): class ids (N,) for the built-in sources
    input_shape: tuple[int, ...]
    dtype: np.dtype
    keys: Optional[np.ndarray] = None  # partition keys (one integer per sample), if the data has them
    lazy = False  # data.storage = stream reads it batch by batch (otherwise it is in memory already)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_ids(self) -> bool:
        """Whether the targets are class ids (one non-negative integer per sample)."""
        return _target_kind(self.labels)

    def read(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """How an error message names sample ``i``."""
        return f"sample {i}"

    def subset(self, keep: np.ndarray) -> "Split":
        """The split without the samples where ``keep`` is False (see ``data.on_corrupt``)."""
        raise NotImplementedError


def _layout(x: np.ndarray) -> str:
    """How a batch of ``x`` becomes (B, C, H, W) images or (B, D) vectors (see :func:`_apply_layout`);
    raises ValueError for other shapes."""
    if x.ndim == 3:
        return "add_channel"
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return "channels_last"
    if x.ndim in (2, 4):
        return "as_is"
    raise ValueError(f"has shape {x.shape}, expected 2 (feature vectors), 3 or 4 (images) dimensions")


def _apply_layout(layout: str, batch: np.ndarray) -> np.ndarray:
    if layout == "add_channel":
        return batch[:, None]
    return batch.transpose(0, 3, 1, 2) if layout == "channels_last" else batch


class ArraySplit(Split):
    """Inputs in an array: in memory, or a read-only memory map of an ``.npy`` file (read on demand;
    a DataLoader worker reopens the file rather than receiving a copy)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray):
        self.x, self.labels = x, np.ascontiguousarray(labels, dtype=np.int64)
        self.layout = _layout(x)
        self.lazy = isinstance(x, np.memmap)
        self.input_shape = tuple(_apply_layout(self.layout, x[:0]).shape[1:])
        self.dtype = x.dtype

    def __getstate__(self) -> dict:
        if isinstance(self.x, np.memmap):
            return {**self.__dict__, "x": None, "path": self.x.filename}
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        path = state.pop("path", None)
        self.__dict__.update(state)
        if path is not None:
            self.x = np.load(path, mmap_mode="r", allow_pickle=False)

    def read(self, idx: np.ndarray) -> np.ndarray:
        return _apply_layout(self.layout, np.asarray(self.x[np.asarray(idx)]))

    def subset(self, keep: np.ndarray) -> "ArraySplit":
        return ArraySplit(self.x[keep], self.labels[keep])


class ImageSplit(Split):
    """Images decoded one by one from files in a directory or members of a zip (never extracted).

    ``names`` are the images' paths relative to ``root``, as a numpy bytes array (one byte per
    character: with the labels, the only per-image memory). Every image must be ``input_shape``."""

    dtype = np.dtype(np.uint8)
    lazy = True

    def __init__(self, root: Path, names: np.ndarray, labels: np.ndarray, input_shape: Optional[tuple] = None):
        self.root, self.names, self.labels = root, names, labels
        self.is_zip = not root.is_dir()
        self._zip: Optional[tuple[int, zipfile.ZipFile]] = None  # (pid, handle): one per process
        self.input_shape = input_shape or self._pixels(0).transpose(2, 0, 1).shape

    def __getstate__(self) -> dict:  # a DataLoader worker opens its own zip handle
        return {**self.__dict__, "_zip": None}

    def describe(self, i: int) -> str:
        return f"{self.root}{':' if self.is_zip else '/'}{self._name(i)}"

    def _name(self, i: int) -> str:
        return self.names[i].decode("utf-8", "surrogateescape")

    def _bytes(self, i: int) -> bytes:
        if not self.is_zip:
            return (self.root / self._name(i)).read_bytes()
        if self._zip is None or self._zip[0] != os.getpid():
            self._zip = (os.getpid(), zipfile.ZipFile(self.root))
        return self._zip[1].read(self._name(i))

    def _pixels(self, i: int) -> np.ndarray:
        """Image ``i`` as RGB (H, W, 3) uint8; a DataError that names the file if it cannot be."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self._bytes(i))) as im:
                return np.asarray(im.convert("RGB"))
        except _READ_ERRORS as e:
            raise CorruptImage(f"cannot decode image {self.describe(i)}: {e}; repair or delete it, or set "
                               "data.on_corrupt=skip to train without it") from e

    def read(self, idx: np.ndarray, bad: Optional[list[int]] = None) -> np.ndarray:
        """The images ``idx`` decoded. With a ``bad`` list, an undecodable image is left zero and
        its position in ``idx`` appended to ``bad`` instead of raising."""
        c, h, w = self.input_shape
        out = np.zeros((len(idx), h, w, c), dtype=np.uint8)
        for j, i in enumerate(np.asarray(idx).tolist()):
            try:
                pixels = self._pixels(i)
            except CorruptImage:
                if bad is None:
                    raise
                bad.append(j)
                continue
            if pixels.shape != out.shape[1:]:
                raise DataError(f"image {self.describe(i)} is {pixels.shape[1]}x{pixels.shape[0]} but the first "
                                f"image is {w}x{h}; all images must share one size")
            out[j] = pixels
        return out.transpose(0, 3, 1, 2)

    def corrupt(self, idx: np.ndarray) -> list[int]:
        """Which of ``idx`` cannot be decoded (every image is decoded once)."""
        bad: list[int] = []
        self.read(idx, bad)
        return [int(idx[j]) for j in bad]

    def subset(self, keep: np.ndarray) -> "ImageSplit":
        return ImageSplit(self.root, self.names[keep], self.labels[keep], self.input_shape)


class CorruptImage(DataError):
    """An image file that cannot be decoded (``data.on_corrupt: skip`` drops it)."""


@dataclass
class Source:
    """A source opened: its two splits, the class count and the input conversion."""

    train: Split
    test: Split
    num_classes: Optional[int]  # None when the targets are not class ids
    normalizer: "Normalizer"
    name: str


class Normalizer:
    """Raw inputs to float32: uint8 / 255, float as stored; then (x - mean) / std per channel
    (per feature for vectors). Elementwise, so a batch converts exactly as the whole split."""

    def __init__(self, norm: Optional[Normalize], input_shape: tuple[int, ...], raw: bool = False):
        self.norm, self.raw = norm, raw
        self.mean = self.std = None
        if norm is not None:
            self.mean, self.std = (_per_channel(v, input_shape, norm) for v in norm)

    def dtype(self, stored: np.dtype) -> torch.dtype:
        """The dtype inputs stored as ``stored`` have after conversion."""
        if self.raw and not np.issubdtype(stored, np.floating):
            return torch.from_numpy(np.zeros(0, stored)).dtype
        return torch.float32

    def __call__(self, raw: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """On ``raw``'s device (a tensor) or the CPU (an array); a new tensor, ``raw`` untouched.
        With ``raw`` (a user's dataset): non-float inputs (token ids) as they are, floats as float32."""
        t = torch.from_numpy(np.ascontiguousarray(raw)) if isinstance(raw, np.ndarray) else raw
        if self.raw and not t.is_floating_point():
            return t.clone()
        t = t.to(torch.float32).div_(255) if t.dtype == torch.uint8 else t.to(torch.float32, copy=True)
        if self.mean is None:
            return t
        return t.sub_(self.mean.to(t.device)).div_(self.std.to(t.device))


def _per_channel(value: Union[Number, Sequence[Number]], input_shape: tuple[int, ...],
                 norm: Normalize) -> torch.Tensor:
    """``value`` broadcast over axis 1 of a batch: channels of images, features of vectors."""
    channels = input_shape[0]
    values = list(value) if isinstance(value, (list, tuple)) else [value] * channels
    if len(values) != channels:
        kind = ("feature vectors", "feature") if len(input_shape) == 1 else ("images", "channel")
        raise ConfigError(f"data.normalize = {list(norm)!r} does not fit the {kind[0]}: a per-{kind[1]} list "
                          f"must have {channels} entries (one per {kind[1]}), got {len(values)}")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, *[1] * (len(input_shape) - 1))


def check_finite(x: torch.Tensor, what: str, describe: Callable[[int], str], where: str) -> None:
    """A DataError naming the first non-finite sample of ``x`` (``describe(j)`` names row j)."""
    found = _first_nonfinite(x)
    if found:
        j, kind, count = found
        raise _nonfinite_error(what, count, len(x), describe(j), kind, where)


def _first_nonfinite(x: torch.Tensor) -> Optional[tuple[int, str, int]]:
    """(first bad row, "NaN" or "inf", how many bad rows), or None when every value is finite."""
    bad = ~torch.isfinite(x.flatten(1)).all(1)
    if not bad.any():
        return None
    j = int(bad.nonzero()[0])
    return j, "NaN" if torch.isnan(x[j]).any() else "inf", int(bad.sum())


def _nonfinite_error(what: str, count: int, total: int, first: str, kind: str, where: str) -> DataError:
    return DataError(f"{where}: {what} holds non-finite values ({count} of {total} samples; the first is "
                     f"{first}, with {kind}); remove or repair those samples (training on them would only diverge)")


def open_source(cfg: DataConfig, data=None) -> Source:
    """Open the data: ``data`` given to :func:`dist_gradalign.fit` (a pair (train, test), or a
    factory of one), or the factory ``cfg.source`` names (built-in or an import path), called with
    ``cfg.kwargs`` (and ``root``, ``download`` where it takes them). Labels (targets) and shapes are
    read, inputs not yet (except the in-memory sources).

    Raises :class:`DataError` when the data is missing or malformed and
    :class:`~dist_gradalign.config.ConfigError` when a user's factory or dataset is wrong,
    ``cfg.normalize`` does not fit the inputs or ``cfg.augment`` is set for non-images."""
    from .. import components

    key, source = "data.source", cfg.source
    if data is not None:
        source = components.describe(data)
        pair = components.call(key, source, data, {}, passthrough=(DataError,)) if callable(data) else data
    else:
        factory = components.load(key, cfg.source)
        pair = components.call(key, source, factory, cfg.kwargs, {"root": cfg.root, "download": cfg.download},
                               passthrough=(DataError,))
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise ConfigError(f"{key} = {source!r} returned {type(pair).__name__}: expected a pair (train, test) of "
                          "map-style datasets (__len__, __getitem__(i) -> (input, target))")
    builtin = all(isinstance(s, Split) for s in pair)
    train, test = (s if isinstance(s, Split) else MapSplit(s, source, name) for s, name in zip(pair, SPLITS))
    if train.input_shape != test.input_shape:
        raise DataError(f"{source} data at {cfg.root!r}: one train input has shape {train.input_shape} "
                        f"but one test input {test.input_shape}; both splits must share one input shape")
    image = len(train.input_shape) == 3 and (train.dtype == np.uint8 or np.issubdtype(train.dtype, np.floating))
    if cfg.augment != "none" and not image:
        what = (f"feature vectors (x_train of shape {(len(train), *train.input_shape)})" if len(train.input_shape) == 1
                else f"inputs of shape {train.input_shape} ({train.dtype})")
        raise ConfigError(f"data.augment = {cfg.augment!r} is not allowed for {what}: it crops and flips images "
                          "(C, H, W); set data.augment=none")
    norm = cfg.normalize if cfg.normalize is not None else DEFAULT_NORMALIZE.get(source)
    if source in ("npz", "npy") and train.dtype != np.uint8:
        norm = None  # float arrays are used exactly as stored
    num_classes = None
    if train.class_ids and test.class_ids:
        num_classes = int(max(train.labels.max(initial=-1), test.labels.max(initial=-1))) + 1
    return Source(train, test, num_classes, Normalizer(norm, train.input_shape, raw=not builtin), source)


def _target_kind(labels: np.ndarray) -> bool:
    """Whether targets are class ids: one non-negative integer per sample."""
    return labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer) and (len(labels) == 0 or labels.min() >= 0)


class MapSplit(Split):
    """A user's map-style dataset (``__len__``, ``__getitem__(i) -> (input, target)``): inputs and
    targets tensors, numpy arrays or numbers, of any shape and dtype, used as they are (no
    scaling; ``data.normalize``, if set, still applies). Targets are read once for partitioning
    and held in memory: from the dataset's ``targets`` attribute when it has one (torchvision's
    convention), else item by item. An optional ``partition_keys`` attribute (one integer per
    sample: an author, a text, a site) partitions by key (``partition.scheme``). Under
    ``data.storage: stream`` the dataset is pickled to the DataLoader workers: define its class
    at module level."""

    lazy = True

    def __init__(self, ds, source: str, split: str):
        self.ds, self.source, self.split = ds, source, split
        try:
            n = len(ds)
        except TypeError:
            raise ConfigError(f"data.source = {source!r}: its {split} dataset is a {type(ds).__name__} without "
                              "__len__: expected a map-style dataset (__len__, __getitem__(i) -> (input, target))") from None
        if n == 0:
            raise ConfigError(f"data.source = {source!r}: its {split} dataset is empty")
        x0, y0 = self._item(0)
        self.input_shape, self.dtype = tuple(x0.shape), x0.dtype
        targets = getattr(ds, "targets", None)
        if targets is not None and len(targets) == n:
            self.labels = self._array(targets, "targets attribute", None)
        else:
            self.labels = np.stack([self._item(i)[1] for i in range(n)])
        keys = getattr(ds, "partition_keys", None)
        self.keys = None if keys is None else np.asarray(keys)
        if self.keys is not None and (self.keys.shape != (n,) or not np.issubdtype(self.keys.dtype, np.integer)):
            raise ConfigError(f"data.source = {source!r}: partition_keys of its {split} dataset must hold one integer "
                              f"per sample ({n}), got shape {self.keys.shape} and dtype {self.keys.dtype}")

    def __len__(self) -> int:
        return len(self.labels)

    def _array(self, value, what: str, i) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        if isinstance(value, (np.ndarray, np.generic, int, float, bool, list)):
            out = np.asarray(value)
            if out.dtype != object:
                return out
        where = f"item {i} of" if i is not None else "the"
        raise ConfigError(f"data.source = {self.source!r}: {where} {self.split} dataset's {what} is a "
                          f"{type(value).__module__}.{type(value).__name__}: expected a tensor, a numpy array or a "
                          "number (convert images with torchvision.transforms.ToTensor())")

    def _item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            item = self.ds[i]
        except Exception as e:
            raise DataError(f"data.source = {self.source!r}: reading item {i} of its {self.split} dataset raised "
                            f"{type(e).__name__}: {e}") from None
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(f"data.source = {self.source!r}: item {i} of its {self.split} dataset is a "
                              f"{type(item).__name__}{f' of {len(item)}' if isinstance(item, (tuple, list)) else ''}:"
                              " expected a pair (input, target)")
        return self._array(item[0], "input", i), self._array(item[1], "target", i)

    def read(self, idx: np.ndarray) -> np.ndarray:
        xs = [self._item(int(i))[0] for i in np.asarray(idx).tolist()]
        for i, x in zip(np.asarray(idx).tolist(), xs):
            if x.shape != self.input_shape or x.dtype != self.dtype:
                raise DataError(f"data.source = {self.source!r}: item {i} of its {self.split} dataset has an input of "
                                f"shape {x.shape} ({x.dtype}), item 0 one of {self.input_shape} ({self.dtype}): all "
                                "inputs must share one shape and dtype")
        return np.stack(xs) if xs else np.zeros((0, *self.input_shape), self.dtype)

    def describe(self, i: int) -> str:
        return f"item {i} of the {self.split} dataset"


# ------------------------------------------------------------------------ built-in sources
# The factories components.BUILTINS names: each returns the (train, test) splits.

def emnist(root: str, download: bool) -> tuple[Split, Split]:
    return _load_torchvision("emnist", root, download)


def cifar10(root: str, download: bool) -> tuple[Split, Split]:
    return _load_torchvision("cifar10", root, download)


def cifar100(root: str, download: bool) -> tuple[Split, Split]:
    return _load_torchvision("cifar100", root, download)


def mnist(root: str, download: bool) -> tuple[Split, Split]:
    return _load_torchvision("mnist", root, download)


def fashionmnist(root: str, download: bool) -> tuple[Split, Split]:
    return _load_torchvision("fashionmnist", root, download)


def npz(root: str) -> tuple[Split, Split]:
    return _open_arrays(Path(root), npy=False)


def npy(root: str) -> tuple[Split, Split]:
    return _open_arrays(Path(root), npy=True)


def imagefolder(root: str) -> tuple[Split, Split]:
    return _open_imagefolder(Path(root))


def digits() -> tuple[Split, Split]:
    return _load_digits()


def drop_corrupt(split: Split, bad: Sequence[int], name: str) -> Split:
    """``split`` without the samples ``bad`` (``data.on_corrupt: skip``); refuses to empty a split."""
    if not len(bad):
        return split
    if len(bad) == len(split):
        raise DataError(f"every image of the {name} split is corrupt (the first: {split.describe(bad[0])})")
    keep = np.ones(len(split), dtype=bool)
    keep[np.asarray(bad)] = False
    return split.subset(keep)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read ``cfg.source`` whole into memory (``data.storage: memory``) as float32 tensors.

    uint8 images are divided by 255 and then normalized with ``cfg.normalize`` (or the
    source's default). Float arrays from ``npz``/``npy`` are used exactly as stored (cast to
    float32): neither scaled nor normalized, even if ``cfg.normalize`` is set. ``digits``
    (values 0..16) is divided by 16 and normalized only if ``cfg.normalize`` is set. Feature
    vectors ``(N, D)`` are treated as one channel per feature (``cfg.normalize`` lists then hold
    one entry per feature).

    With ``cfg.on_corrupt = "skip"`` undecodable images are dropped (the returned dataset's
    ``skipped`` lists them); otherwise the first stops the load with a :class:`DataError`
    naming it. Non-finite inputs (NaN or inf) are a :class:`DataError` naming the array and
    the first bad sample."""
    src = open_source(cfg)
    return materialize(src, cfg)


def materialize(src: Source, cfg: DataConfig, chunk: int = 8192) -> Dataset:
    """The source's splits read whole and converted (see :func:`load_dataset`), chunk by chunk
    into one preallocated tensor: the peak is the float data plus one chunk."""
    xs, ys = {}, {}
    skipped: list[str] = []
    where = f"{src.name} data at {cfg.root!r}"
    for name, split in (("train", src.train), ("test", src.test)):
        skip = cfg.on_corrupt == "skip" and isinstance(split, ImageSplit)
        out = torch.empty((len(split), *split.input_shape), dtype=src.normalizer.dtype(split.dtype))
        bad, written, n_bad, first = [], 0, 0, None
        for start in range(0, len(split), chunk):
            idx = np.arange(start, min(start + chunk, len(split)))
            if skip:
                lost: list[int] = []
                raw = split.read(idx, lost)
                bad += [int(idx[j]) for j in lost]
                raw = np.delete(raw, lost, axis=0)
            else:
                raw = split.read(idx)
            t = out[written:written + len(raw)] = src.normalizer(raw)
            found = _first_nonfinite(t)
            if found:
                n_bad += found[2]
                first = first or (written + found[0], found[1])
            written += len(raw)
        if n_bad:
            raise _nonfinite_error(f"x_{name}", n_bad, written, f"sample {first[0]}", first[1], where)
        skipped += [split.describe(i) for i in bad]
        split = drop_corrupt(split, bad, name)
        xs[name] = out[:written]
        ys[name] = torch.from_numpy(split.labels)
    return Dataset(x_train=xs["train"], y_train=ys["train"], x_test=xs["test"], y_test=ys["test"],
                   num_classes=src.num_classes, name=src.name, skipped=skipped)


# ------------------------------------------------------------------------ torchvision

_TORCHVISION: dict[str, tuple[str, dict]] = {
    "emnist": ("EMNIST", {"split": "balanced"}),
    "cifar10": ("CIFAR10", {}),
    "cifar100": ("CIFAR100", {}),
    "mnist": ("MNIST", {}),
    "fashionmnist": ("FashionMNIST", {}),
}


def _load_torchvision(source: str, root: str, download: bool) -> tuple[Split, Split]:
    """A torchvision dataset's raw ``.data``/``.targets`` arrays (no per-item transforms)."""
    from torchvision import datasets

    cls_name, kwargs = _TORCHVISION[source]
    cls = getattr(datasets, cls_name)
    out = []
    for train in (True, False):
        try:
            ds = cls(root=root, train=train, download=download, **kwargs)
        except (RuntimeError, OSError) as e:
            if download:
                hint = ("downloading it failed; download it on a machine with internet access "
                        "(data.download=true) and copy the folder here")
            else:
                hint = ("set data.download=true on a machine with internet access to fetch it, "
                        "or copy torchvision's files there")
            raise DataError(f"{source} ({cls_name}) not found under data.root = {root!r}: "
                            f"{hint} ({e})") from e
        x = np.asarray(ds.data)  # NHW (MNIST-like) or NHWC (CIFAR)
        out.append(ArraySplit(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2), np.asarray(ds.targets)))
    return out[0], out[1]


# ------------------------------------------------------------------------ npz and npy

_NEED = ("arrays x_train (N,H,W), (N,H,W,C) or (N,C,H,W) images, or (N,D) feature vectors, uint8 or float, "
         "y_train (N,) integer labels, and x_test, y_test likewise")


def _open_arrays(path: Path, npy: bool) -> tuple[Split, Split]:
    """``x_train, y_train, x_test, y_test`` from an ``.npz`` file (read whole) or from a directory
    of ``.npy`` files (``npy``: the inputs memory-mapped, read on demand), checked."""
    need = (f"it must be a directory of x_train.npy, y_train.npy, x_test.npy, y_test.npy: {_NEED}" if npy
            else f"it must be an .npz file with {_NEED}")
    kind = "npy directory" if npy else "npz file"
    if not (path.is_dir() if npy else path.is_file()):
        raise DataError(f"{kind} {str(path)!r} (data.root) not found: {need}")
    if npy:
        missing = [k for k in NPZ_KEYS if not (path / f"{k}.npy").is_file()]
        if missing:
            raise DataError(f"npy directory {str(path)!r} lacks {', '.join(k + '.npy' for k in missing)}: {need}")
        try:  # inputs memory-mapped; labels read (they are small and partitioning needs them all)
            arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r" if k.startswith("x") else None,
                                 allow_pickle=False) for k in NPZ_KEYS}
        except _READ_ERRORS as e:
            raise DataError(f"npy directory {str(path)!r} cannot be read ({e}): {need}") from e
    else:
        arrays = _read_npz(path, need)

    def problem(msg: str) -> DataError:
        return DataError(f"{kind} {str(path)!r}: {msg}; {need}")

    splits = []
    for split in SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        try:
            _layout(x)
        except ValueError as e:
            raise problem(f"x_{split} {e}") from None
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise problem(f"x_{split} has dtype {x.dtype}, expected uint8 or float")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise problem(f"y_{split} has shape {y.shape} and dtype {y.dtype}, expected 1-d integer labels")
        if len(y) != len(x):
            raise problem(f"x_{split} has {len(x)} samples but y_{split} has {len(y)} labels")
        if len(y) and y.min() < 0:
            raise problem(f"y_{split} holds negative labels")
        splits.append(ArraySplit(x, y))
    if splits[0].dtype != splits[1].dtype:
        raise problem(f"x_train is {splits[0].dtype} but x_test is {splits[1].dtype}")
    return splits[0], splits[1]


def _read_npz(path: Path, need: str) -> dict[str, np.ndarray]:
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
            return {k: f[k] for k in NPZ_KEYS}
        except _READ_ERRORS as e:
            raise DataError(f"npz file {str(path)!r} cannot be read ({e}): {need}") from e


# ------------------------------------------------------------------------ image folder

_LAYOUT = "it must hold train/<class>/*.jpg|jpeg|png and test/<class>/* images"


def _open_imagefolder(root: Path) -> tuple[Split, Split]:
    """List ``train/<class>/*`` and ``test/<class>/*`` of a directory or a zip (not extracted),
    sorted by (class, path); labels are the classes' sorted order. Nothing is decoded but the
    first training image (for the input shape)."""
    if root.is_dir():
        folders = {(split, e.name) for split in SPLITS if (root / split).is_dir()
                   for e in os.scandir(root / split) if e.is_dir()}
        parts = [(split, cls, e.name) for split, cls in folders for e in os.scandir(root / split / cls) if e.is_file()]
    elif root.is_file() and zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as zf:
            members = zf.namelist()
        parts = [tuple(m.split("/")) for m in members if not m.endswith("/")]
        dirs = [tuple(m.rstrip("/").split("/")) for m in members if m.endswith("/")]
        folders = ({p[:2] for p in parts if p[0] in SPLITS and len(p) >= 3}
                   | {p[:2] for p in dirs if p[0] in SPLITS and len(p) >= 2})
    else:
        raise DataError(f"image folder {str(root)!r} (data.root) not found or not a directory/.zip file: {_LAYOUT}")
    found: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for p in parts:
        if len(p) == 3 and p[0] in found and p[2].lower().endswith(IMAGE_SUFFIXES):
            found[p[0]].append((p[1], "/".join(p)))
    for split, items in found.items():
        if not items:
            raise DataError(f"image folder {str(root)!r}: no images under {split}/<class>/; {_LAYOUT}")
    empty = sorted(f"{s}/{c}" for s, c in folders if not any(cls == c for cls, _ in found[s]))
    if empty:
        raise DataError(f"image folder {str(root)!r}: class folder(s) {', '.join(empty)} hold no .jpg, .jpeg or "
                        ".png image; add images or remove the folder(s)")
    classes = sorted({cls for cls, _ in found["train"]})
    index = {cls: i for i, cls in enumerate(classes)}
    unknown = sorted({cls for cls, _ in found["test"]} - set(classes))
    if unknown:
        raise DataError(f"image folder {str(root)!r}: test classes {unknown} have no train/ folder")
    splits, shape = [], None
    for split in SPLITS:
        items = sorted(found[split])
        names = np.array([n.encode("utf-8", "surrogateescape") for _, n in items], dtype=np.bytes_)
        labels = np.array([index[cls] for cls, _ in items], dtype=np.int64)
        splits.append(ImageSplit(root, names, labels, shape))
        shape = splits[0].input_shape
    return splits[0], splits[1]


# ------------------------------------------------------------------------ digits

def _load_digits() -> tuple[Split, Split]:
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
    return ArraySplit(x[train], y[train]), ArraySplit(x[test], y[test])
