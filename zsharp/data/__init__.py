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

The names are imported on first use (PEP 562), so ``zsharp.data.registry`` (and
``from zsharp.data import DATASETS``) work without importing PyTorch: the workflow's dry run
validates configs with the registry alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zsharp.data.digits import embedded_digits
    from zsharp.data.download import download_dataset
    from zsharp.data.errors import (
        ChecksumError,
        CorruptArchiveError,
        CorruptDatasetError,
        DatasetError,
        DatasetNotReadyError,
    )
    from zsharp.data.loader import DeviceLoader, EpochPlan, crop_flip, eval_loader, train_loader
    from zsharp.data.prepared import Prepared, dataset_dir, is_ready, load_prepared
    from zsharp.data.registry import (
        DATASETS,
        DatasetSpec,
        RemoteFile,
        get_spec,
        register_dataset,
    )

# public name -> the submodule that defines it
_SOURCES: dict[str, str] = {
    "embedded_digits": "digits",
    "download_dataset": "download",
    "ChecksumError": "errors",
    "CorruptArchiveError": "errors",
    "CorruptDatasetError": "errors",
    "DatasetError": "errors",
    "DatasetNotReadyError": "errors",
    "DeviceLoader": "loader",
    "EpochPlan": "loader",
    "crop_flip": "loader",
    "eval_loader": "loader",
    "train_loader": "loader",
    "Prepared": "prepared",
    "dataset_dir": "prepared",
    "is_ready": "prepared",
    "load_prepared": "prepared",
    "DATASETS": "registry",
    "DatasetSpec": "registry",
    "RemoteFile": "registry",
    "get_spec": "registry",
    "register_dataset": "registry",
}

__all__ = [
    "DATASETS",
    "ChecksumError",
    "CorruptArchiveError",
    "CorruptDatasetError",
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
    "register_dataset",
    "train_loader",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access, then cache the value."""
    try:
        module = _SOURCES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
