"""Datasets for the ZSharp experiments: download, prepare once, load onto the device.

Typical use::

    from zsharp.data import download_dataset, load_prepared, train_loader, eval_loader

    download_dataset("cifar10", "data")           # no-op when data/cifar10/READY exists
    data = load_prepared("cifar10", "data")        # uint8 tensors + stats
    train = train_loader(data, 256, device="cuda", seed=0)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train:
            ...

``embedded_digits()`` gives a small real dataset (scikit-learn's digits) with no disk or
network, for tests and smoke runs.
"""

from zsharp.data.digits import embedded_digits
from zsharp.data.download import download_dataset
from zsharp.data.errors import (
    ChecksumError,
    CorruptArchiveError,
    DatasetError,
    DatasetNotReadyError,
)
from zsharp.data.loader import DeviceLoader, EpochPlan, crop_flip, eval_loader, train_loader
from zsharp.data.prepared import Prepared, dataset_dir, is_ready, load_prepared
from zsharp.data.registry import DATASETS, DatasetSpec, RemoteFile, get_spec

__all__ = [
    "DATASETS",
    "ChecksumError",
    "CorruptArchiveError",
    "DatasetError",
    "DatasetNotReadyError",
    "DatasetSpec",
    "DeviceLoader",
    "EpochPlan",
    "Prepared",
    "RemoteFile",
    "crop_flip",
    "dataset_dir",
    "download_dataset",
    "embedded_digits",
    "eval_loader",
    "get_spec",
    "is_ready",
    "load_prepared",
    "train_loader",
]
