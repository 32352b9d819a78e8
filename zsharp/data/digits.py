"""scikit-learn's bundled digits: a small *real* image dataset that needs no network.

1,797 8×8 grey images with values 0..16, rescaled to uint8 0..255 (``round(v·255/16)``),
one channel, split 80/20 stratified by class with a fixed seed. The split indices (into
``load_digits()``'s order) are recorded in meta.json so the split is reproducible even if
scikit-learn's shuffling ever changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsharp.data.prepared import Prepared, Staging, channel_stats

__all__ = [
    "DIGITS_SEED",
    "DIGITS_TEST_FRACTION",
    "digits_arrays",
    "embedded_digits",
    "prepare_digits",
]

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2


@lru_cache(maxsize=1)
def digits_arrays() -> dict[str, Any]:
    """The digits split as numpy arrays (cached; treat as read-only).

    Returns a dict with ``train_x``/``test_x`` (uint8 N×1×8×8), ``train_y``/``test_y``
    (int64), ``train_index``/``test_index`` (positions in ``load_digits()``) and ``md5``
    (of the rescaled images and labels, as the "source checksum").
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_index, test_index = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SEED,
    )
    # Sorted so the stored order is the original one; loaders shuffle anyway.
    train_index, test_index = np.sort(train_index), np.sort(test_index)
    digest = hashlib.md5(images.tobytes() + labels.tobytes(), usedforsecurity=False)
    arrays = {
        "train_x": images[train_index],
        "train_y": labels[train_index],
        "test_x": images[test_index],
        "test_y": labels[test_index],
        "train_index": train_index,
        "test_index": test_index,
        "md5": digest.hexdigest(),
    }
    for value in arrays.values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False  # cached: nobody may change it under other callers
    return arrays


def _split_meta(arrays: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": "sklearn.model_selection.train_test_split, stratified by label",
        "seed": DIGITS_SEED,
        "test_fraction": DIGITS_TEST_FRACTION,
        "train_index": arrays["train_index"].tolist(),
        "test_index": arrays["test_index"].tolist(),
    }


def _meta(arrays: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_classes": 10,
        "class_names": [str(d) for d in range(10)],
        "label_mapping": "the digit itself",
        "source": {"files": {"sklearn.datasets.load_digits": arrays["md5"]}, "verified": False},
        "split": _split_meta(arrays),
    }


def prepare_digits(files: Mapping[str, Path], stage: Staging) -> dict[str, Any]:
    """Stage the digits splits; return the metadata (the caller adds the name and commits).

    The registry's ``prepare`` for ``digits``. ``files`` is empty: the data ships inside
    scikit-learn, so there is nothing to fetch.
    """
    arrays = digits_arrays()
    for split in ("train", "test"):
        stage.save(split, arrays[f"{split}_x"], arrays[f"{split}_y"])
    return _meta(arrays)


def embedded_digits() -> Prepared:
    """The digits dataset straight from scikit-learn, no disk and no network.

    Identical (same split, same pixels, same stats) to ``download_dataset("digits", root)``
    followed by ``load_prepared("digits", root)``; for tests and quick experiments. The
    tensors are fresh copies, safe to modify.
    """
    arrays = digits_arrays()
    mean, std = channel_stats(arrays["train_x"])
    meta = {"name": "digits", **_meta(arrays), "mean": list(mean), "std": list(std)}
    return Prepared(
        train_x=torch.tensor(arrays["train_x"]),
        train_y=torch.tensor(arrays["train_y"]),
        test_x=torch.tensor(arrays["test_x"]),
        test_y=torch.tensor(arrays["test_y"]),
        num_classes=10,
        mean=mean,
        std=std,
        image_size=8,
        channels=1,
        name="digits",
        class_names=tuple(meta["class_names"]),
        meta=meta,
    )
