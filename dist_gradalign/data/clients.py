"""The data side of a run, built before the trainer: the source opened (built-in or the user's),
its storage chosen, undecodable images dropped, the validation hold-out taken, the training set
partitioned over the clients, and this rank's view of the data (:class:`InMemory` or
:class:`Streamed`). Every rank builds the same partition from (labels or keys, config, seed).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..backend import Backend
from ..config import Config, ConfigError
from .partition import holdout, keys_of, partition
from .sources import ImageSplit, Source, drop_corrupt, materialize, open_source
from .stream import InMemory, Streamed, cast, choose_storage, find_corrupt


@dataclass
class ClientData:
    source: Source
    store: Any  # InMemory or Streamed: what the executors gather from and evaluation reads
    shards: list[np.ndarray]  # each client's training indices (sorted)
    val: np.ndarray  # the validation hold-out's training indices
    record: dict  # data.json: the storage chosen and why, the images skipped
    first: tuple[torch.Tensor, torch.Tensor]  # two training samples on the device (the parts' check)

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.shards]

    @classmethod
    def build(cls, cfg: Config, be: Backend, dtype: torch.dtype, data: Any = None,
              plan: Optional[Callable[[int], list[torch.Tensor]]] = None) -> "ClientData":
        """``data``: the user's (train, test) pair or factory given to ``fit`` (else ``data.source``);
        ``plan(rnd)``: the dataset indices this rank gathers in round ``rnd``, in order (what
        ``data.storage: stream`` prefetches; the trainer's)."""
        src = _open(cfg, be, data)
        dev = be.device
        record = choose_storage(cfg.data, src, be.local_world_size, dev, dtype.itemsize)
        stream = record["storage"] == "stream"
        if be.is_main and stream:
            print(f"data: storage stream ({record['reason']}), {cfg.data.workers} loader worker(s) per rank",
                  file=sys.stderr, flush=True)
        if stream:
            record["skipped"] = _drop_corrupt(cfg, be, src)
            targets = src.train.labels
            first = src.normalizer(src.train.read(np.arange(min(2, len(targets))))), targets[:2]
        else:
            ds = materialize(src, cfg.data)  # with on_corrupt = skip, undecodable images are dropped here
            record["skipped"] = ds.skipped
            targets = ds.y_train.numpy()
            first = ds.x_train[:2], targets[:2]
        # partition keys: class ids, or a user dataset's partition_keys (iid needs neither)
        keys = keys_of(targets, src.train.keys, cfg.partition.scheme, src.name)
        # the validation hold-out leaves the training set before partitioning (disjoint from every shard)
        val, rest = holdout(keys, cfg.data.val_fraction, cfg.seed)
        if cfg.data.val_fraction > 0 and len(val) == 0:
            raise ConfigError(f"data.val_fraction = {cfg.data.val_fraction} holds out no sample: every class has "
                              f"fewer than {0.5 / cfg.data.val_fraction:.0f} training samples; raise it")
        shards = [rest[s] for s in partition(keys[rest], cfg.partition, cfg.seed)]
        if min(len(s) for s in shards) == 0:
            raise ConfigError(f"partition.num_clients = {cfg.partition.num_clients} leaves a client with no data "
                              f"({len(keys)} training samples, scheme {cfg.partition.scheme!r})")
        # evaluation: each rank a slice of the test set and of the validation hold-out
        if stream:
            store = Streamed(src, val, be.rank, be.world_size, dev, dtype, cfg.data, plan, cfg.train.rounds)
        else:
            store = InMemory(ds, val, be.rank, be.world_size, dev, dtype)
        first = cast(torch.as_tensor(first[0]), dev, dtype), cast(torch.as_tensor(first[1]), dev, dtype)
        return cls(src, store, shards, val, record, first)


def _open(cfg: Config, be: Backend, data: Any) -> Source:
    """Open the data source (with ``data.download``, local rank 0 fetches it first, once per node)."""
    if cfg.data.download and be.world_size > 1:
        src = open_source(cfg.data, data) if be.local_rank == 0 else None
        be.barrier()
        return src or open_source(cfg.data, data)
    return open_source(cfg.data, data)


def _drop_corrupt(cfg: Config, be: Backend, src: Source) -> list[str]:
    """``data.on_corrupt: skip`` when streaming: every image is decoded once, each rank a slice
    (with ``data.workers`` processes), and the ranks agree on the list by one all-reduce.
    Returns the images dropped."""
    skipped = []
    for name in ("train", "test"):
        split = getattr(src, name)
        if cfg.data.on_corrupt != "skip" or not isinstance(split, ImageSplit):
            continue
        if be.is_main:
            print(f"data.on_corrupt = skip: decoding the {len(split)} {name} images once to find corrupt "
                  "ones", file=sys.stderr, flush=True)
        mask = torch.zeros(len(split), device=be.device)
        mask[find_corrupt(split, np.arange(be.rank, len(split), be.world_size), cfg.data.workers)] = 1
        bad = be.all_reduce_(mask, count=False).nonzero().flatten().tolist()
        skipped += [split.describe(i) for i in bad]
        setattr(src, name, drop_corrupt(split, bad, name))
    return skipped
