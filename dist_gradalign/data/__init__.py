"""Datasets, client partitions, the per-round client sampler and batch augmentation."""
from .augment import augment_batch
from .partition import holdout, partition
from .sampler import sample_clients
from .sources import DataError, Dataset, load_dataset

__all__ = ["Dataset", "DataError", "load_dataset", "augment_batch", "holdout", "partition", "sample_clients"]
