"""The upstream files and archive formats of the built-in image datasets.

Each ``parse_*`` function is a registry ``prepare`` function: it takes ``{upstream file
name: local path}`` and a staging area, stages the ``train`` and ``test`` splits as uint8
N×C×H×W images plus int64 labels, and returns the metadata that only it knows (class names,
how labels were assigned). Any failure to read a file becomes one
:class:`~zsharp.data.errors.CorruptArchiveError` naming that file.

Where torchvision has the dataset (CIFAR-10, CIFAR-100, SVHN), the ``*_files`` functions
read every URL, file name and md5 from its dataset classes at run time, so there is no copy
of them here to drift. The fetching and the parsing stay ours, for what torchvision's
classes do not do (tried with torchvision 0.29.1 on the test archives):

* atomic downloads (``.part`` then rename) that detect a connection closed early:
  ``torchvision.datasets.utils.download_url`` from a server that stops 100 bytes short
  raises nothing and keeps the 98,408 of 98,508 bytes under the final name (with an md5 it
  raises "File not found or corrupted." and still leaves the truncated file there);
* ``--source`` mirrors, local files and ``file://`` URLs (the classes only know their own
  URL, and their downloader fails on ``file://``: it reads ``response.length``);
* one-line errors that name the file;
* a pickle reader that refuses anything but arrays: torchvision's CIFAR10 uses plain
  ``pickle.load``, and a tampered batch ran its ``os.system`` payload when loaded;
* one pass over each file: the md5 is computed while downloading (torchvision reads the
  file again to check it).
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from zsharp.data.errors import CorruptArchiveError, DatasetError, one_line
from zsharp.data.prepared import Staging
from zsharp.data.registry import RemoteFile

__all__ = [
    "cifar10_files",
    "cifar100_files",
    "parse_cifar10",
    "parse_cifar100",
    "parse_svhn",
    "parse_tiny_imagenet",
    "svhn_files",
]

# SVHN's splits we prepare ("extra", 531,131 more train images, is not used).
SVHN_SPLITS = ("train", "test")


# --------------------------------------------------------------------------- upstream files


def cifar10_files() -> tuple[RemoteFile, ...]:
    """CIFAR-10's archive as ``torchvision.datasets.CIFAR10`` publishes it."""
    from torchvision.datasets import CIFAR10

    return (RemoteFile(CIFAR10.filename, CIFAR10.url, CIFAR10.tgz_md5),)


def cifar100_files() -> tuple[RemoteFile, ...]:
    """CIFAR-100's archive as ``torchvision.datasets.CIFAR100`` publishes it."""
    from torchvision.datasets import CIFAR100

    return (RemoteFile(CIFAR100.filename, CIFAR100.url, CIFAR100.tgz_md5),)


def svhn_files() -> tuple[RemoteFile, ...]:
    """SVHN's train and test ``.mat`` files as ``torchvision.datasets.SVHN`` publishes them."""
    from torchvision.datasets import SVHN

    files = []
    for split in SVHN_SPLITS:
        url, filename, md5 = SVHN.split_list[split]
        files.append(RemoteFile(filename, url, md5))
    return tuple(files)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure to read ``path`` into a one-line CorruptArchiveError naming it."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as exc:  # tarfile, zipfile, gzip, pickle, scipy and PIL all differ
        detail = one_line(exc) or "no detail"
        raise CorruptArchiveError(
            f"{path}: cannot read the archive, it is truncated or corrupt "
            f"({type(exc).__name__}: {detail})"
        ) from exc


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptArchiveError(
            f"{path}: labels span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}"
        )


# --------------------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches and nothing else.

    The batches are dicts of lists, bytes and numpy arrays; refusing every other global
    means a tampered archive (with ``verify=False``) cannot run code on load.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 spells bytes in protocol-2 pickles
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes) -> dict[bytes, Any]:
    # encoding='bytes': the batches were written by Python 2, keys come back as bytes.
    return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()


def _read_tar_members(path: Path, wanted: list[str]) -> dict[str, bytes]:
    """Read the named members of a .tar.gz into memory; error if any is missing."""
    found: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None  # isfile() members always have data
                found[member.name] = handle.read()
    missing = [name for name in wanted if name not in found]
    if missing:
        raise CorruptArchiveError(f"{path}: no member {missing[0]}; not the upstream archive")
    return found


def _cifar_batches(
    path: Path, batches: Mapping[str, list[str]], label_key: bytes
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[bytes, Any]]:
    """Read the pickled batches of a CIFAR archive.

    Args:
        batches: split -> member names to concatenate, plus ``"meta"`` -> [meta member].
        label_key: ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).

    Returns:
        split -> (N×3×32×32 uint8, N int64), and the meta dict.
    """
    wanted = [name for names in batches.values() for name in names]
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with _reading(path):
        members = _read_tar_members(path, wanted)
        meta = _unpickle(members[batches["meta"][0]])
        for split in ("train", "test"):
            dicts = [_unpickle(members[name]) for name in batches[split]]
            # Rows are 3072 bytes: the 1024 red values, then green, then blue, each
            # row-major, so a reshape gives C×H×W with no transpose.
            x = np.concatenate([np.asarray(d[b"data"], dtype=np.uint8) for d in dicts])
            x = x.reshape(-1, 3, 32, 32)
            y = np.concatenate([np.asarray(d[label_key], dtype=np.int64) for d in dicts])
            splits[split] = (x, y)
    return splits, meta


def parse_cifar10(files: Mapping[str, Path], stage: Staging) -> dict[str, Any]:
    """``cifar-10-python.tar.gz``: ``data_batch_1..5`` → train, ``test_batch`` → test."""
    path = files["cifar-10-python.tar.gz"]
    top = "cifar-10-batches-py/"
    layout = {
        "train": [f"{top}data_batch_{i}" for i in range(1, 6)],
        "test": [f"{top}test_batch"],
        "meta": [f"{top}batches.meta"],
    }
    splits, meta = _cifar_batches(path, layout, b"labels")
    names = [n.decode() for n in meta[b"label_names"]]
    return _stage_splits(path, stage, splits, names, "the archive's labels (batches.meta order)")


def parse_cifar100(files: Mapping[str, Path], stage: Staging) -> dict[str, Any]:
    """``cifar-100-python.tar.gz``: ``train``/``test`` pickles, the 100 fine labels."""
    path = files["cifar-100-python.tar.gz"]
    top = "cifar-100-python/"
    layout = {"train": [f"{top}train"], "test": [f"{top}test"], "meta": [f"{top}meta"]}
    splits, meta = _cifar_batches(path, layout, b"fine_labels")
    names = [n.decode() for n in meta[b"fine_label_names"]]
    return _stage_splits(
        path, stage, splits, names, "the archive's fine labels (meta fine_label_names order)"
    )


def _stage_splits(
    path: Path,
    stage: Staging,
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    class_names: list[str],
    label_mapping: str,
) -> dict[str, Any]:
    for split, (x, y) in splits.items():
        _check_labels(path, y, len(class_names))
        stage.save(split, x, y)
    return {
        "num_classes": len(class_names),
        "class_names": class_names,
        "label_mapping": label_mapping,
    }


# --------------------------------------------------------------------------- SVHN


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN ``*_32x32.mat``: X is 32×32×3×N uint8, y is N×1 with 10 meaning digit 0."""
    from scipy.io import loadmat  # scipy is slow to import; only SVHN needs it

    with _reading(path):
        mat = loadmat(path, variable_names=["X", "y"])
        x, y = mat["X"], mat["y"]
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
            raise CorruptArchiveError(
                f"{path}: X has shape {x.shape} and y {y.shape}, expected 32×32×3×N and N×1"
            )
        # H×W×C×N -> N×C×H×W (the same transpose torchvision uses).
        images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)), dtype=np.uint8)
        labels = y.reshape(-1).astype(np.int64)
        labels[labels == 10] = 0
    return images, labels


def parse_svhn(files: Mapping[str, Path], stage: Staging) -> dict[str, Any]:
    """SVHN's ``train_32x32.mat`` and ``test_32x32.mat`` (label 10 becomes 0)."""
    for split in SVHN_SPLITS:
        path = files[f"{split}_32x32.mat"]
        x, y = _read_svhn_mat(path)
        _check_labels(path, y, 10)
        stage.save(split, x, y)
    return {
        "num_classes": 10,
        "class_names": [str(d) for d in range(10)],
        "label_mapping": "the digit itself (upstream label 10 means digit 0 and becomes 0)",
    }


# --------------------------------------------------------------------------- Tiny-ImageNet

_TINY = "tiny-imagenet-200/"


def _decode_jpeg_into(data: bytes, out: np.ndarray, size: int) -> None:
    """Decode one JPEG into ``out`` (3×size×size uint8); grey images are made RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    if rgb.size != (size, size):
        raise ValueError(f"image is {rgb.size[0]}×{rgb.size[1]}, expected {size}×{size}")
    out[...] = np.asarray(rgb).transpose(2, 0, 1)


def _tiny_members(
    path: Path, zf: zipfile.ZipFile, index: Mapping[str, int]
) -> dict[str, list[tuple[str, int]]]:
    """(member name, label) per split: train from folder names, val from the annotations.

    Ordered by label then file name (what ImageFolder would give once val is regrouped
    into one folder per class).
    """
    train = []
    for name in zf.namelist():
        parts = name.split("/")
        # tiny-imagenet-200/train/<wnid>/images/<file>.JPEG
        if len(parts) == 5 and parts[1] == "train" and parts[3] == "images" and parts[4]:
            if parts[2] not in index:
                raise CorruptArchiveError(f"{path}: train folder {parts[2]} is not in wnids.txt")
            train.append((name, index[parts[2]]))
    val = []
    annotations = zf.read(_TINY + "val/val_annotations.txt").decode()
    for line in annotations.splitlines():
        if not line.strip():
            continue
        # "<file>\t<wnid>\t<x>\t<y>\t<w>\t<h>": only the first two columns matter here.
        filename, wnid = line.split("\t")[:2]
        if wnid not in index:
            raise CorruptArchiveError(
                f"{path}: val_annotations.txt names {wnid}, which is not in wnids.txt"
            )
        val.append((f"{_TINY}val/images/{filename}", index[wnid]))
    val_images = {
        n for n in zf.namelist() if n.startswith(_TINY + "val/images/") and not n.endswith("/")
    }
    unlabelled = val_images - {name for name, _ in val}
    if unlabelled:
        raise CorruptArchiveError(
            f"{path}: {min(unlabelled)} and {len(unlabelled) - 1} other val images have no "
            "line in val/val_annotations.txt"
        )
    by_label_then_name = itemgetter(1, 0)
    return {
        "train": sorted(train, key=by_label_then_name),
        "test": sorted(val, key=by_label_then_name),
    }


def parse_tiny_imagenet(files: Mapping[str, Path], stage: Staging) -> dict[str, Any]:
    """``tiny-imagenet-200.zip``: train folders → train, val (labelled by annotations) → test.

    The test/ folder has no labels and is ignored. Class index = position of the wnid in
    the *sorted* wnids (ImageFolder's convention, which most Tiny-ImageNet code follows),
    not the order of wnids.txt. JPEGs are decoded straight from the zip with PIL.
    """
    path = files["tiny-imagenet-200.zip"]
    with _reading(path), zipfile.ZipFile(path) as zf:
        wnids = zf.read(_TINY + "wnids.txt").decode().split()
        if len(set(wnids)) != len(wnids) or not wnids:
            raise CorruptArchiveError(f"{path}: wnids.txt is empty or repeats a wnid")
        classes = sorted(wnids)
        index = {wnid: i for i, wnid in enumerate(classes)}
        for split, members in _tiny_members(path, zf, index).items():
            images = stage.images(split, len(members), 3, 64)
            for i, (name, _) in enumerate(members):
                try:
                    _decode_jpeg_into(zf.read(name), images[i], 64)
                except Exception as exc:
                    raise CorruptArchiveError(
                        f"{path}: cannot decode {name} ({type(exc).__name__}: {one_line(exc)})"
                    ) from exc
            stage.save(split, None, [label for _, label in members])
    return {
        "num_classes": len(classes),
        "class_names": classes,
        "label_mapping": "index of the wnid in sorted(wnids.txt) (ImageFolder order); test "
        "split = upstream val, labelled by val/val_annotations.txt",
    }
