"""Client partitions (iid, shards, percentage_iid, dirichlet) and the per-round client sampler."""
from __future__ import annotations

import numpy as np
import pytest

from dist_gradalign.config import ConfigError, PartitionConfig
from dist_gradalign.data import partition, sample_clients

SCHEMES = ("iid", "shards", "percentage_iid", "dirichlet")


def balanced_labels(classes: int = 10, per_class: int = 100) -> np.ndarray:
    """Labels with equal class sizes, in a shuffled (but fixed) dataset order."""
    return np.random.default_rng(123).permutation(np.repeat(np.arange(classes), per_class))


def cfg(scheme: str, **kw) -> PartitionConfig:
    return PartitionConfig(scheme=scheme, **{"num_clients": 10, "iid_fraction": 0.3, **kw})


def label_sets(labels: np.ndarray, parts: list[np.ndarray]) -> list[set[int]]:
    return [set(labels[p].tolist()) for p in parts]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_clients", [1, 7, 10, 47])
def test_disjoint_complete_sorted(scheme, num_clients):
    labels = balanced_labels()
    parts = partition(labels, cfg(scheme, num_clients=num_clients), seed=3)
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0) and len(p) > 0
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_given_seed(scheme):
    labels = balanced_labels()
    c = cfg(scheme, shards_per_client=2)
    a, b = partition(labels, c, seed=5), partition(labels, c, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other = partition(labels, c, seed=6)
    assert any(not np.array_equal(x, y) for x, y in zip(a, other))


def test_shards_one_per_client_ignores_seed():
    labels = balanced_labels()
    a, b = (partition(labels, cfg("shards"), seed=s) for s in (0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_iid_near_equal_sizes():
    parts = partition(balanced_labels(), cfg("iid", num_clients=7), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1000
    assert all(len(s) > 5 for s in label_sets(balanced_labels(), parts))


def test_shards_one_class_per_client():
    labels = balanced_labels(classes=47, per_class=30)
    parts = partition(labels, cfg("shards", num_clients=47), seed=0)
    assert [s for s in label_sets(labels, parts)] == [{c} for c in range(47)]
    assert all(len(p) == 30 for p in parts)


def test_shards_ties_keep_dataset_order():
    labels = np.array([1, 0, 1, 0, 1, 0])
    parts = partition(labels, cfg("shards", num_clients=3), seed=0)
    # stable sort by label: 0s at 1, 3, 5 then 1s at 0, 2, 4; cut into 3 shards
    assert [p.tolist() for p in parts] == [[1, 3], [0, 5], [2, 4]]


def test_shards_two_per_client_at_most_two_labels():
    labels = balanced_labels()
    parts = partition(labels, cfg("shards", num_clients=20, shards_per_client=2), seed=0)
    sets = label_sets(labels, parts)
    assert all(len(s) <= 2 for s in sets) and any(len(s) == 2 for s in sets)
    assert all(len(p) == 50 for p in parts)


def test_percentage_iid_extremes():
    labels = balanced_labels()
    zero = partition(labels, cfg("percentage_iid", iid_fraction=0.0), seed=0)
    shards = partition(labels, cfg("shards"), seed=0)
    assert label_sets(labels, zero) == label_sets(labels, shards)
    assert all(np.array_equal(a, b) for a, b in zip(zero, shards))
    zero2 = partition(labels, cfg("percentage_iid", iid_fraction=0.0, shards_per_client=2), seed=4)
    shards2 = partition(labels, cfg("shards", shards_per_client=2), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(zero2, shards2))
    full = partition(labels, cfg("percentage_iid", iid_fraction=1.0), seed=0)
    assert all(len(s) >= 8 for s in label_sets(labels, full))
    assert all(len(p) == 100 for p in full)


def test_percentage_iid_mixes_both_parts():
    labels = balanced_labels()
    parts = partition(labels, cfg("percentage_iid", iid_fraction=0.5), seed=0)
    for p in parts:
        counts = np.sort(np.bincount(labels[p], minlength=10))
        # a label-sorted shard of 50 spans at most 2 labels; the iid half brings the others
        assert counts[-2:].sum() >= 50 and np.count_nonzero(counts) > 3
        assert len(p) == 100


@pytest.mark.parametrize("alpha", [0.01, 0.1, 100.0])
@pytest.mark.parametrize("min_size", [1, 20, 100])
def test_dirichlet_min_size_always_met(alpha, min_size):
    labels = balanced_labels()
    parts = partition(labels, cfg("dirichlet", alpha=alpha, min_size=min_size), seed=0)
    assert min(len(p) for p in parts) >= min_size
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_dirichlet_alpha_controls_heterogeneity():
    labels = balanced_labels()
    skewed = partition(labels, cfg("dirichlet", alpha=0.05), seed=0)
    even = partition(labels, cfg("dirichlet", alpha=1000.0), seed=0)
    mean_labels = lambda parts: np.mean([len(s) for s in label_sets(labels, parts)])
    assert mean_labels(skewed) < 5 and mean_labels(even) == 10


@pytest.mark.parametrize("scheme, kw, key", [
    ("iid", {"num_clients": 1001}, "partition.num_clients"),
    ("dirichlet", {"num_clients": 1001}, "partition.num_clients"),
    ("shards", {"num_clients": 600, "shards_per_client": 2}, "partition.shards_per_client"),
    ("percentage_iid", {"num_clients": 10, "shards_per_client": 101}, "partition.shards_per_client"),
    ("dirichlet", {"num_clients": 10, "min_size": 101}, "partition.min_size"),
])
def test_infeasible_raises_config_error(scheme, kw, key):
    with pytest.raises(ConfigError, match=key) as err:
        partition(balanced_labels(), cfg(scheme, **kw), seed=0)
    assert "N = 1000" in str(err.value)


def test_feasible_edge_exactly_n():
    labels = balanced_labels()
    parts = partition(labels, cfg("dirichlet", num_clients=10, min_size=100, alpha=0.01), seed=0)
    assert all(len(p) == 100 for p in parts)
    assert all(len(p) == 1 for p in partition(labels, cfg("iid", num_clients=1000), seed=0))


# ------------------------------------------------------------------------ sampler

def test_sampler_distinct_sorted_in_range():
    for r in range(50):
        ids = sample_clients(seed=0, round=r, num_clients=47, k=10)
        assert len(ids) == 10 == len(set(ids)) and ids == sorted(ids)
        assert all(isinstance(i, int) and 0 <= i < 47 for i in ids)


def test_sampler_pure_function_of_seed_and_round():
    first = [sample_clients(7, r, 47, 10) for r in range(20)]
    np.random.seed(0)  # global RNG state must not matter
    again = [sample_clients(7, r, 47, 10) for r in reversed(range(20))][::-1]
    assert first == again
    assert len({tuple(ids) for ids in first}) > 15  # changes across rounds
    assert sample_clients(8, 0, 47, 10) != first[0]


def test_sampler_uniform():
    counts = np.zeros(10)
    for r in range(2000):
        counts[sample_clients(1, r, 10, 3)] += 1
    assert np.allclose(counts / 2000, 0.3, atol=0.04)


def test_sampler_all_clients_and_bad_k():
    assert sample_clients(0, 5, 10, 10) == list(range(10))
    for k in (0, 11):
        with pytest.raises(ValueError):
            sample_clients(0, 0, 10, k)
