"""Data sets as arrays plus metadata, and their federated partitions as index arrays.

Public surface::

    ds = load_dataset("fashion_mnist", root=None)        # cached per process
    parts = partition_indices(ds, "dirichlet", 100, seed=0, alpha=0.3)
    train_idx, val_idx = client_split(parts[7], 0.1, seed=0, client_id=7)
    x, y = ds.x_train[train_idx], ds.y_train[train_idx]  # copies of one client's rows
    describe_partition(parts, ds.y_train)                # sizes, empty clients, label skew

Importing this package is cheap: scikit-learn, Pillow, ``datasets`` and
``flwr_datasets`` are imported only by the loaders / partition schemes that need them.
"""

from .base import DataError, FederatedDataset
from .locate import check_data_root, resolve_data_root
from .partition import SCHEMES, client_split, describe_partition, partition_indices
from .sources import DATASETS, load_dataset
from .synthetic import SyntheticDataset, synthetic_dataset

__all__ = [
    "DATASETS",
    "DataError",
    "FederatedDataset",
    "SCHEMES",
    "SyntheticDataset",
    "check_data_root",
    "client_split",
    "describe_partition",
    "load_dataset",
    "partition_indices",
    "resolve_data_root",
    "synthetic_dataset",
]
