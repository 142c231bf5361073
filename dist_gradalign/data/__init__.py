"""Datasets, client partitions, the per-round client sampler and batch augmentation."""
from .augment import augment_batch
from .partition import holdout, keys_of, partition
from .sampler import sample_clients
from .sources import DataError, Dataset, load_dataset

__all__ = ["Dataset", "DataError", "load_dataset", "augment_batch", "holdout", "keys_of", "partition", "sample_clients"]
