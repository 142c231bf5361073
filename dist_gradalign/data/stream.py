"""Where the training set lives while a run trains (``data.storage``), behind one interface.

The executors ask for batches by dataset index (``gather``) and evaluation walks each rank's
slice of the test and validation sets (``eval_batches``). Two implementations:

- :class:`InMemory` (``memory``): the whole decoded set on the rank's device; a batch is one
  gather. Fastest while the data fits.
- :class:`Streamed` (``stream``): nothing decoded up front. A rank's reads are a pure function
  of (seed, round, client) (see :mod:`dist_gradalign.executor`), so the trainer hands over a
  ``plan(rnd)``: the batches of round ``rnd`` on this rank, in the order the executor gathers
  them. A :class:`torch.utils.data.DataLoader` with ``data.workers`` processes reads that plan,
  rounds ahead, into pinned memory (on CUDA); ``gather`` takes the next prefetched batch and
  copies it with ``non_blocking``. A batch that is not the planned one (a plan out of step
  with the executor) is read directly instead and counted in ``misses``: slower, never
  different. A rank reads only its own clients' samples of each round, and its slices of the
  test and validation sets.

Both modes decode and convert with the same :class:`~dist_gradalign.data.sources.Normalizer`
and augment after the gather, so they give bitwise the same inputs and the same run.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import STREAMING_SOURCES, DataConfig
from .sources import DataError, Dataset, ImageSplit, Source, Split, check_finite

Batch = tuple[torch.Tensor, torch.Tensor]


def choose_storage(cfg: DataConfig, src: Source, ranks_per_node: int, device: torch.device,
                   element_size: int) -> dict:
    """Resolve ``data.storage`` and return the record written to ``data.json``.

    The decoded data (float inputs of both splits) is held once per rank: ``ranks_per_node``
    times on a node's host memory, or once on each rank's GPU. ``auto`` streams when that
    exceeds the budget: ``data.memory_budget_gb``, or else half of the available memory
    (MemAvailable, and the headroom under this process's cgroup memory limit; on a GPU, its
    free memory). ``memory`` that cannot fit at all (more than the budget, or all the available
    memory) is a :class:`DataError` before anything is decoded, not an out-of-memory kill."""
    decoded = (len(src.train) + len(src.test)) * int(np.prod(src.train.input_shape)) * element_size
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        need, where, of = decoded, "this rank's GPU", "the GPU's free memory"
    else:
        free, cgroup = _available_memory()
        need, where = decoded * ranks_per_node, f"{ranks_per_node} rank(s) of this node"
        of = "the available memory" + (" under the cgroup limit" if cgroup else "")
    if cfg.memory_budget_gb is not None:
        budget, limit, of = int(cfg.memory_budget_gb * 2**30), int(cfg.memory_budget_gb * 2**30), "data.memory_budget_gb"
    else:
        budget, limit, of = free // 2, free, f"half of {of}"
    fits = need <= budget
    mode, reason = cfg.storage, "data.storage"
    if mode == "auto":
        if not fits and not src.train.lazy:
            mode, reason = "memory", f"{src.name} cannot stream (only {', '.join(STREAMING_SOURCES)} and user datasets do)"
        else:
            mode = "memory" if fits else "stream"
            reason = f"decoded data for {where} {_size(need)} {'<=' if fits else '>'} {_size(budget)} ({of})"
    if mode == "memory" and need > limit:
        hint = ("set data.storage=stream (or auto)" if src.train.lazy else
                "convert it for streaming (python -m dist_gradalign.data.convert) and set data.storage=stream")
        raise DataError(f"data.storage = memory would hold {_size(need)} of decoded {src.name} data for {where}, "
                        f"more than {_size(limit)} ({of.replace('half of ', '')}): {hint}, or use fewer ranks per node")
    return {"storage": mode, "requested": cfg.storage, "reason": reason, "decoded_bytes_per_rank": decoded,
            "budget_bytes": budget, "workers": cfg.workers if mode == "stream" else 0}


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _available_memory() -> tuple[int, bool]:
    """Bytes this process may still allocate: MemAvailable of /proc/meminfo, or less when its
    memory cgroup (v1 or v2) has a limit (the limit minus the group's anonymous memory: its
    page cache is reclaimable). Also: whether the cgroup was the tighter bound."""
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    headroom = _cgroup_headroom()
    return (headroom, True) if headroom is not None and headroom < avail else (avail, False)


def _cgroup_headroom() -> Optional[int]:
    """min over this process's memory cgroup and its ancestors of (limit - anonymous memory)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            base, files = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "total_rss")
        elif controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():  # v2
            base, files = Path("/sys/fs/cgroup"), ("memory.max", "anon")
        else:
            continue
        parts = Path(path).parts[1:]
        for depth in range(len(parts) + 1):
            d = base.joinpath(*parts[:depth])
            try:
                raw = (d / files[0]).read_text().strip()
                stat = dict(l.split() for l in (d / "memory.stat").read_text().splitlines())
            except (OSError, ValueError):
                continue
            if raw != "max" and int(raw) < 2**62:
                room = int(raw) - int(stat.get(files[1], 0))
                best = room if best is None else min(best, room)
    return best


def cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device``; floating-point data in the run's ``dtype``, integers (class ids, token
    ids) as they are."""
    return t.to(device, dtype) if t.is_floating_point() else t.to(device)


class InMemory:
    """The decoded data on the device: ``gather`` is an index, evaluation slices tensors."""

    def __init__(self, ds: Dataset, val: np.ndarray, rank: int, world: int, device: torch.device,
                 dtype: torch.dtype):
        self.x, self.y = cast(ds.x_train, device, dtype), cast(ds.y_train, device, dtype)
        v = torch.as_tensor(val[rank::world], dtype=torch.long)
        self.eval_sets = {"test": (cast(ds.x_test[rank::world], device, dtype), cast(ds.y_test[rank::world], device, dtype)),
                          "val": (cast(ds.x_train[v], device, dtype), cast(ds.y_train[v], device, dtype))}
        self.misses = 0

    def start_round(self, rnd: int) -> None:
        pass

    def gather(self, idx: torch.Tensor) -> Batch:
        """Inputs ``(*idx.shape, *input_shape)`` and labels ``idx.shape`` of dataset indices ``idx``."""
        i = idx.to(self.x.device)
        return self.x[i], self.y[i]

    def eval_batches(self, which: str, batch: int) -> Iterator[Batch]:
        x, y = self.eval_sets[which]
        for start in range(0, len(y), batch):
            yield x[start:start + batch], y[start:start + batch]

    def close(self) -> None:
        pass


class _Failed:
    """A worker's DataError, re-raised in the training process without the worker's traceback."""

    def __init__(self, message: str):
        self.message = message


class BatchReader(torch.utils.data.Dataset):
    """Reads one batch of a split per item (the item is the batch's indices): the raw inputs
    (uint8 images stay uint8: a quarter of the bytes to move) and the labels. The conversion
    to float runs where the batch is used, on the rank's device (:meth:`Streamed._to_device`).

    ``arrays``: hand numpy arrays to the DataLoader, which pickles them through its pipe, rather
    than tensors, which it moves through shared memory (a round trip to torch's shared-memory
    manager per tensor, about 0.85 ms on these CPUs, and worth it only for pinned copies to a GPU)."""

    def __init__(self, split: Split, name: str, arrays: bool = False):
        self.split, self.name, self.arrays = split, name, arrays

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, idx: torch.Tensor):
        flat = idx.reshape(-1).numpy()
        try:
            raw = np.ascontiguousarray(self.split.read(flat))
            if raw.dtype != np.uint8:  # (uint8 cannot be non-finite; float arrays are used as stored)
                check_finite(torch.from_numpy(raw), f"x_{self.name}", lambda j: self.split.describe(int(flat[j])),
                             "streamed data")
        except DataError as e:
            return _Failed(str(e))
        labels = self.split.labels
        x, y = raw.reshape(*idx.shape, *raw.shape[1:]), labels[flat].reshape(*idx.shape, *labels.shape[1:])
        return (x, y) if self.arrays else (torch.from_numpy(x), torch.from_numpy(y))


def _as_is(item):
    return item


def _loader(dataset, sampler, workers: int, prefetch: Optional[int] = None, pin: bool = False,
            persistent: bool = False) -> DataLoader:
    """A DataLoader of pre-batched items. Workers start from a forkserver, never by forking the
    training process: a fork while another thread of it holds CPython's thread-state lock
    deadlocks the child (seen under load with gloo ranks on Python 3.11), and the forkserver is
    single-threaded. It imports torch and this package once; each worker is then a cheap fork."""
    context = None
    if workers:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", __name__])
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers, collate_fn=_as_is,
                      prefetch_factor=prefetch if workers else None, pin_memory=pin,
                      persistent_workers=persistent and workers > 0, multiprocessing_context=context)


def find_corrupt(split: ImageSplit, idx: np.ndarray, workers: int, chunk: int = 256) -> list[int]:
    """The undecodable images among ``idx``, each decoded once by ``workers`` processes."""
    chunks = [torch.from_numpy(idx[s:s + chunk]) for s in range(0, len(idx), chunk)]
    return [i for bad in _loader(_CorruptScan(split), chunks, workers) for i in bad]


class _CorruptScan(torch.utils.data.Dataset):
    def __init__(self, split: ImageSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, idx: torch.Tensor) -> list[int]:
        return self.split.corrupt(idx.numpy())


class _Plan:
    """The DataLoader's sampler: round ``first`` onwards, each round's planned batches in order.
    Runs in the training process; ``expected`` keeps what it handed out, in order."""

    def __init__(self, plan: Callable[[int], list[torch.Tensor]], last_round: int):
        self.plan, self.last_round, self.first = plan, last_round, 1
        self.expected: deque[torch.Tensor] = deque()

    def __iter__(self):
        for rnd in range(self.first, self.last_round + 1):
            for idx in self.plan(rnd):
                self.expected.append(idx)
                yield idx


class _Items:
    """A sampler over a list that can be replaced between iterations (persistent workers)."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)


class _EvalReader(torch.utils.data.Dataset):
    """Items ``(split, indices)``: one loader serves the test and the validation slices."""

    def __init__(self, readers: dict[str, BatchReader]):
        self.readers = readers

    def __len__(self) -> int:
        return sum(map(len, self.readers.values()))

    def __getitem__(self, item):
        split, idx = item
        return self.readers[split][idx]


class Streamed:
    """Batches read from disk when needed, prefetched by DataLoader workers from the plan.

    Two loaders per rank with persistent workers (``data.workers`` each): the training plan,
    and evaluation. A restart of the plan (first round, resume, a miss) reuses the workers."""

    def __init__(self, src: Source, val: np.ndarray, rank: int, world: int, device: torch.device,
                 dtype: torch.dtype, cfg: DataConfig, plan: Callable[[int], list[torch.Tensor]], last_round: int):
        self.device, self.dtype = device, dtype
        pin = device.type == "cuda"  # tensors through shared memory, pinned by the loader; else arrays
        self.readers = {name: BatchReader(getattr(src, name), name, arrays=not pin) for name in ("train", "test")}
        self.normalizer = src.normalizer
        self.eval_idx = {"test": ("test", np.arange(rank, len(src.test), world)),
                         "val": ("train", np.asarray(val[rank::world]))}
        self.plan = _Plan(plan, last_round)
        self.loader = _loader(self.readers["train"], self.plan, cfg.workers, cfg.prefetch, pin, persistent=True)
        self.eval_items = _Items()
        self.eval_loader = _loader(_EvalReader(self.readers), self.eval_items, cfg.workers, cfg.prefetch, pin,
                                   persistent=True)
        self.it: Optional[Iterator] = None
        self.next_round = 0
        self.misses = 0  # batches read directly because the plan was out of step

    def start_round(self, rnd: int) -> None:
        """Continue the plan if it is at ``rnd``; otherwise (first round, resume, a miss) restart it there."""
        if self.it is None or rnd != self.next_round:
            self.plan.first = rnd
            self.plan.expected.clear()
            self.it = iter(self.loader)  # with persistent workers: the same workers, the plan from rnd
        self.next_round = rnd + 1

    def gather(self, idx: torch.Tensor) -> Batch:
        if self.it is not None:
            try:
                out = next(self.it)
                want = self.plan.expected.popleft()
            except StopIteration:
                out = want = None
            if want is not None and torch.equal(want, idx):
                return self._to_device(out)
            self.it = None  # out of step: read directly until the next round restarts the plan
        self.misses += 1
        return self._to_device(self.readers["train"][idx])

    def _to_device(self, out) -> Batch:
        """The raw batch to the device, then converted there (as memory mode converts: bitwise equal)."""
        if isinstance(out, _Failed):
            raise DataError(out.message)
        raw, y = (torch.as_tensor(v) for v in out)
        x = self.normalizer(raw.to(self.device, non_blocking=True))
        return cast(x, self.device, self.dtype), cast(y.to(self.device, non_blocking=True), self.device, self.dtype)

    def eval_batches(self, which: str, batch: int) -> Iterator[Batch]:
        split, idx = self.eval_idx[which]
        self.eval_items.items = [(split, torch.from_numpy(idx[s:s + batch])) for s in range(0, len(idx), batch)]
        for out in self.eval_loader:
            yield self._to_device(out)

    def close(self) -> None:
        """Stop the workers: they live as long as their loaders, which are dropped here."""
        self.it = self.loader = self.eval_loader = None
