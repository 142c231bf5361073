"""Split a training set over clients (``partition.scheme``).

- ``iid``: a seeded permutation cut into ``num_clients`` near-equal shards.
- ``shards``: samples sorted by label (stable) cut into ``num_clients * shards_per_client``
  contiguous near-equal shards. With one shard per client, shard c goes to client c, so
  ``num_clients`` = number of classes with equal class sizes gives one class per client (the
  paper's heterogeneous split); otherwise shards are dealt to clients by a seeded permutation.
- ``percentage_iid``: a seeded fraction ``iid_fraction`` of the samples is spread iid, the rest
  is split as ``shards``; every client gets a part of both.
- ``dirichlet``: per class, client proportions ~ Dirichlet(``alpha``); every client is given at
  least ``min_size`` samples (resampling, then moving samples from the largest clients).
- ``by_key``: one client per distinct key, in sorted key order (``num_clients`` must equal the
  number of keys): a user dataset's ``partition_keys`` (one text, author or site per client).

The "labels" of the label-based schemes are the class ids, or a user dataset's partition keys
where it has them (the trainer chooses: :func:`keys_of`); data without either (per-token
targets, regression) can be partitioned ``iid`` only.

Every scheme is disjoint, complete and a deterministic function of the labels, config and seed.

:func:`holdout` takes the validation set (``data.val_fraction``) out of the training set before
any of these run, so it is disjoint from every client's shard.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..config import ConfigError, PartitionConfig

# One independent random stream per purpose, all derived from the run's seed.
_TAG_IID, _TAG_SHARDS, _TAG_PERCENTAGE, _TAG_DIRICHLET, _TAG_HOLDOUT = 101, 102, 103, 104, 105
_DIRICHLET_TRIES = 100


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, tag]))


def holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the training indices into (validation, rest), both sorted int64.

    Stratified: of each class's n_c samples, ``round(fraction * n_c)`` are held out, chosen by a
    permutation from a generator seeded by (seed, 105) alone, so the hold-out does not depend
    on the partition, the algorithm or the world size. ``fraction`` 0 holds out nothing.
    """
    labels = np.asarray(labels)
    if fraction <= 0.0:
        return np.zeros(0, dtype=np.int64), np.arange(len(labels), dtype=np.int64)
    rng = _rng(seed, _TAG_HOLDOUT)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        val.append(rng.permutation(members)[:int(round(fraction * len(members)))])
    val = np.sort(np.concatenate(val)).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(labels), dtype=np.int64), val, assume_unique=True)
    return val, rest


def keys_of(targets: np.ndarray, keys: Optional[np.ndarray], scheme: str, source: str) -> np.ndarray:
    """What the training set is partitioned (and its validation hold-out stratified) by: the
    data's partition keys, else the targets if they are class ids, else (for ``iid``, which needs
    neither) one key for all."""
    if keys is not None:
        return keys
    if targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer):
        return targets
    if scheme != "iid":
        raise ConfigError(f"partition.scheme = {scheme!r} needs class-id targets or partition keys, but the targets "
                          f"of data.source = {source!r} are {targets.dtype} of shape {targets.shape}: use "
                          "partition.scheme=iid, or give the train dataset a partition_keys attribute (one integer "
                          "per sample)")
    return np.zeros(len(targets), dtype=np.int64)


def partition(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Return, for each client c, the sorted int64 indices of its samples in the train set.

    Raises :class:`~dist_gradalign.config.ConfigError` when the settings cannot be met with
    ``len(labels)`` samples.
    """
    labels = np.asarray(labels)
    n, k = len(labels), cfg.num_clients
    _check_feasible(cfg, n)
    if cfg.scheme == "by_key" and len(np.unique(labels)) != k:
        raise ConfigError(f"partition.scheme = 'by_key' gives one client per partition key: the data has "
                          f"{len(np.unique(labels))} distinct keys, but partition.num_clients = {k}; set it to "
                          f"{len(np.unique(labels))}")
    if cfg.scheme == "iid":
        parts = np.array_split(_rng(seed, _TAG_IID).permutation(n), k)
    elif cfg.scheme == "shards":
        parts = _shards(np.arange(n), labels, k, cfg.shards_per_client, seed)
    elif cfg.scheme == "percentage_iid":
        perm = _rng(seed, _TAG_PERCENTAGE).permutation(n)
        n_iid = int(round(cfg.iid_fraction * n))
        rest = np.sort(perm[n_iid:])  # dataset order, so label ties stay in dataset order
        # array_split gives the larger chunks to the first clients; dealing the iid chunks in
        # reverse keeps every client non-empty when there are fewer samples than shards.
        iid_parts = np.array_split(perm[:n_iid], k)[::-1]
        shard_parts = _shards(rest, labels[rest], k, cfg.shards_per_client, seed)
        parts = [np.concatenate([a, b]) for a, b in zip(iid_parts, shard_parts)]
    elif cfg.scheme == "dirichlet":
        parts = _dirichlet(labels, k, cfg.alpha, cfg.min_size, _rng(seed, _TAG_DIRICHLET))
    elif cfg.scheme == "by_key":
        parts = [np.flatnonzero(labels == key) for key in np.unique(labels)]
    else:
        raise ConfigError(f"partition.scheme = {cfg.scheme!r} is not allowed: choose one of "
                          "iid, shards, percentage_iid, dirichlet, by_key")
    return [np.sort(p).astype(np.int64) for p in parts]


def _check_feasible(cfg: PartitionConfig, n: int) -> None:
    k = cfg.num_clients
    if k > n:
        raise ConfigError(f"partition.num_clients = {k} is out of range: the training set has only "
                          f"N = {n} samples")
    if cfg.scheme in ("shards", "percentage_iid") and k * cfg.shards_per_client > n:
        raise ConfigError(f"partition.num_clients * partition.shards_per_client = {k} * "
                          f"{cfg.shards_per_client} = {k * cfg.shards_per_client} shards is out of range: "
                          f"the training set has only N = {n} samples")
    if cfg.scheme == "dirichlet" and k * cfg.min_size > n:
        raise ConfigError(f"partition.num_clients * partition.min_size = {k} * {cfg.min_size} = "
                          f"{k * cfg.min_size} is out of range: the training set has only N = {n} samples")


def _shards(idx: np.ndarray, labels: np.ndarray, k: int, per_client: int, seed: int) -> list[np.ndarray]:
    """Sort ``idx`` by ``labels`` (stable), cut into k*per_client shards, give per_client to each client."""
    shards = np.array_split(idx[np.argsort(labels, kind="stable")], k * per_client)
    if per_client == 1:
        return shards
    owner = _rng(seed, _TAG_SHARDS).permutation(k * per_client)
    return [np.concatenate([shards[s] for s in owner[c * per_client:(c + 1) * per_client]]) for c in range(k)]


def _dirichlet(labels: np.ndarray, k: int, alpha: float, min_size: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, split its samples over clients by Dirichlet(alpha) proportions.

    Resample up to 100 times until every client has ``min_size`` samples; if that fails,
    move samples from the largest clients to the short ones (always possible as N >= k*min_size).
    """
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(_DIRICHLET_TRIES):
        chunks: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1] * len(idx)).astype(np.int64)
            for c, chunk in enumerate(np.split(idx, cuts)):
                chunks[c].append(chunk)
        parts = [np.concatenate(c) for c in chunks]
        if min(len(p) for p in parts) >= min_size:
            return parts
    return _top_up(parts, min_size)


def _top_up(parts: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move samples from the largest clients to those below ``min_size`` (deterministic)."""
    for short in range(len(parts)):
        while len(parts[short]) < min_size:
            donor = max(range(len(parts)), key=lambda c: len(parts[c]))  # ties: lowest id
            take = min(min_size - len(parts[short]), len(parts[donor]) - min_size)
            parts[short] = np.concatenate([parts[short], parts[donor][-take:]])
            parts[donor] = parts[donor][:-take]
    return parts
