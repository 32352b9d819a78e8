"""The prepared on-disk format, its atomic writer and its loader.

A prepared dataset lives in ``<root>/<name>/``::

    train_x.npy  uint8, N×C×H×W     train_y.npy  int64, N
    test_x.npy   uint8, M×C×H×W     test_y.npy   int64, M
    meta.json    name, num_classes, image_size, channels, mean, std (from train), class
                 names, counts, source md5s, and each array file's shape, dtype, size
                 in bytes and BLAKE2b digest
    READY        written last; its presence is the only signal that the rest is complete

Every load verifies the arrays against ``meta.json`` (:func:`verify_prepared`): each
file's ``.npy`` header (shape, dtype) and size (a truncated file shows at once), and its
digest where one is recorded (one read of the file, about a second per GB, which also puts
it in the page cache for training). A file that does not match withdraws READY — the
dataset is no longer prepared, so ``zsharp download`` (and the workflow's download rule)
prepares it again — and raises :class:`~zsharp.data.errors.CorruptDatasetError`, one line
naming the file and that command.

``.npy`` rather than a pickle so that Tiny-ImageNet's 1.2 GB train split can be memory-mapped
instead of read whole. Everything is first written to hidden temp files in the same
directory and renamed into place (atomic on one file system), so a failure at any point
leaves no READY and no half-written array under a final name. The arrays' space is
reserved before they are filled (a memory-mapped write to a full disk is a SIGBUS, not an
error), so a full disk is an :class:`OSError` naming the file; the temp files of a failed
preparation are removed, and those of a killed one by the next preparation, which holds the
dataset folder's :class:`~zsharp.atomic.DirectoryLock` (one preparation at a time).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsharp.atomic import BusyError, DirectoryLock, named, remove_stale_temps
from zsharp.data.errors import CorruptDatasetError, DatasetError, DatasetNotReadyError
from zsharp.data.registry import get_spec

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "READY_FILE",
    "Prepared",
    "Staging",
    "channel_stats",
    "check_prepared",
    "dataset_dir",
    "is_ready",
    "load_prepared",
    "staging",
    "verify_prepared",
]

READY_FILE = "READY"
META_FILE = "meta.json"
SPLITS = ("train", "test")
FORMAT_VERSION = 1
# Images per chunk when measuring mean/std: bounds the float64 scratch to ~400 MB at 64×64.
_STATS_CHUNK = 4096
ARRAYS = ("train_x", "train_y", "test_x", "test_y")
# The digest of a prepared array: BLAKE2b (hashlib, ~1 GB/s), read in 16 MiB blocks.
_DIGEST_BLOCK = 1 << 24
# A JSON array of numbers spread over several lines by json.dumps(indent=...).
_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


@dataclass
class Prepared:
    """A prepared dataset in memory (or memory-mapped): uint8 images, int64 labels, stats.

    ``mean``/``std`` are per channel, for pixel values scaled to [0, 1], measured on the
    train split.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    channels: int
    name: str = ""
    class_names: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # the default would print four tensors
        return (
            f"Prepared(name={self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, num_classes={self.num_classes})"
        )


def dataset_dir(root: str | os.PathLike[str], name: str) -> Path:
    """``<root>/<canonical name>``: where ``name`` is (or will be) prepared."""
    return Path(root).expanduser() / get_spec(name).name


def is_ready(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a completely prepared dataset."""
    return (Path(directory) / READY_FILE).is_file()


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 N×C×H×W images scaled to [0, 1].

    Sums are accumulated in float64 over chunks so that a memory-mapped 1.2 GB array is
    streamed rather than converted whole.
    """
    channels = x.shape[1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(x), _STATS_CHUNK):
        chunk = np.asarray(x[start : start + _STATS_CHUNK], dtype=np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += np.square(chunk).sum(axis=(0, 2, 3))
    count = len(x) * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(round(m, 6)) for m in mean), tuple(float(round(s, 6)) for s in std)


class Staging:
    """Collects a dataset's arrays in temp files and publishes them all at once.

    Use through :func:`staging`, which deletes every temp file if anything fails.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._temps: dict[str, Path] = {}  # final file name -> temp path
        self._arrays: dict[str, np.ndarray] = {}

    def images(self, split: str, count: int, channels: int, size: int) -> np.ndarray:
        """A writable uint8 ``count×channels×size×size`` array backed by a temp ``.npy``.

        Parsers fill it in place, so big splits never need to fit in memory twice.
        """
        final = f"{split}_x.npy"
        path = self._temp(final)
        try:
            array = np.lib.format.open_memmap(
                path, mode="w+", dtype=np.uint8, shape=(count, channels, size, size)
            )
            _reserve(path)
        except OSError as error:
            raise named(error, self.directory / final) from error
        self._arrays[f"{split}_x"] = array
        return array

    def save(self, split: str, x: np.ndarray | None, y: Sequence[int] | np.ndarray) -> None:
        """Stage ``split``'s labels, and its images unless they were filled via :meth:`images`."""
        if x is not None:
            target = self.images(split, x.shape[0], x.shape[1], x.shape[2])
            target[...] = x
        labels = np.asarray(y, dtype=np.int64).reshape(-1)
        images = self._arrays[f"{split}_x"]
        if len(labels) != len(images):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
        # Through a handle: np.save appends ".npy" to a path that does not end in it.
        try:
            with open(self._temp(f"{split}_y.npy"), "wb") as fh:
                np.save(fh, labels)
        except OSError as error:
            raise named(error, self.directory / f"{split}_y.npy") from error
        self._arrays[f"{split}_y"] = labels

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Compute the stats, write meta.json, rename everything into place, then READY.

        Returns the full metadata written.
        """
        missing = [f"{s}_{k}" for s in SPLITS for k in "xy" if f"{s}_{k}" not in self._arrays]
        if missing:
            raise ValueError(f"nothing staged for {', '.join(missing)}")
        train_x = self._arrays["train_x"]
        mean, std = channel_stats(train_x)
        full = {
            "format_version": FORMAT_VERSION,
            **meta,
            "image_size": int(train_x.shape[2]),
            "channels": int(train_x.shape[1]),
            "mean": list(mean),
            "std": list(std),
            "counts": {s: len(self._arrays[f"{s}_y"]) for s in SPLITS},
            "layout": "uint8 NCHW images, int64 labels",
        }
        try:
            for array in self._arrays.values():
                if isinstance(array, np.memmap):
                    array.flush()
            self._arrays.clear()  # drop the memmaps before renaming their files
            full["files"] = {f"{key}.npy": _describe(self._temps[f"{key}.npy"]) for key in ARRAYS}
            self._temp(META_FILE).write_text(_dumps(full))
            for final, temp in self._temps.items():
                temp.replace(self.directory / final)
            self._temps.clear()
            ready = self._temp(READY_FILE)
            ready.write_text(f"format_version {FORMAT_VERSION}\n")
            ready.replace(self.directory / READY_FILE)
        except OSError as error:
            raise named(error, self.directory) from error
        self._temps.clear()
        return full

    def abort(self) -> None:
        """Delete every temp file written so far."""
        self._arrays.clear()
        for temp in self._temps.values():
            temp.unlink(missing_ok=True)
        self._temps.clear()

    def _temp(self, final: str) -> Path:
        # Same directory as the final file, so the rename cannot cross file systems.
        path = self.directory / f".{final}.{os.getpid()}.tmp"
        self._temps[final] = path
        return path


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes the file must have) from a ``.npy`` file's header."""
    fmt = np.lib.format
    with path.open("rb") as handle:
        version = fmt.read_magic(handle)
        readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f".npy format version {version}, not one this project writes")
        shape, fortran, dtype = readers[version](handle)
        if fortran:
            raise ValueError("Fortran-ordered")
        offset = handle.tell()
    return tuple(shape), dtype, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        while block := handle.read(_DIGEST_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    """What meta.json records of an array file: shape, dtype, size, digest."""
    shape, dtype, _ = _header(path)
    return {
        "shape": list(shape),
        "dtype": dtype.str,
        "bytes": path.stat().st_size,
        "blake2b": _digest(path),
    }


def verify_prepared(
    directory: str | os.PathLike[str], meta: dict[str, Any], *, digests: bool = True
) -> None:
    """Check a prepared dataset's arrays against its ``meta.json``.

    Always, for each array: the file exists, its ``.npy`` header reads, its shape and dtype
    are those of the split (``counts``, ``channels``, ``image_size``; uint8 images, int64
    labels) and its size is what the header says (no truncation, nothing appended); with
    ``digests``, its BLAKE2b digest where meta.json records one (datasets prepared by older
    versions record none). Raises :class:`CorruptDatasetError` naming the first file that
    does not match; cheap without ``digests`` (four headers and four ``stat`` calls).
    """
    directory = Path(directory)
    recorded = meta.get("files") or {}
    counts = meta.get("counts") or {}
    for key in ARRAYS:
        path = directory / f"{key}.npy"
        split, kind = key.split("_")
        try:
            shape, dtype, size = _header(path)
            actual = path.stat().st_size
        except FileNotFoundError:
            raise CorruptDatasetError(f"{path}: missing although {READY_FILE} exists") from None
        except (OSError, ValueError) as error:
            raise CorruptDatasetError(f"{path}: not a readable .npy array ({error})") from None
        if actual != size:
            raise CorruptDatasetError(
                f"{path}: {actual} bytes, but its header ({shape}, {dtype}) needs {size}"
                + (" (truncated)" if actual < size else "")
            )
        n = counts.get(split)
        if kind == "x":
            c, s = meta.get("channels"), meta.get("image_size")
            expected, want = (n, c, s, s), np.dtype(np.uint8)
        else:
            expected, want = (n,), np.dtype(np.int64)
        if shape != expected or dtype != want:
            raise CorruptDatasetError(
                f"{path}: holds {dtype} {shape}, but {META_FILE} records {want} {expected}"
            )
        record = recorded.get(path.name) or {}
        if digests and record.get("blake2b") and _digest(path) != record["blake2b"]:
            raise CorruptDatasetError(
                f"{path}: its content differs from the one prepared ({META_FILE} records "
                f"BLAKE2b {record['blake2b']})"
            )


def _dumps(meta: dict[str, Any]) -> str:
    """Indented JSON, but with lists of numbers on one line (digits records 1,797 indices)."""
    text = json.dumps(meta, indent=2)
    return _NUMBER_LIST.sub(_join_numbers, text) + "\n"


def _join_numbers(match: re.Match[str]) -> str:
    return "[" + ", ".join(item.strip() for item in match.group(1).split(",")) + "]"


def _reserve(path: Path) -> None:
    """Allocate the whole file now, so that filling its memory map cannot hit a full disk
    (which the kernel reports as SIGBUS, killing the process without a word)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


@contextmanager
def staging(directory: Path) -> Iterator[Staging]:
    """Stage a dataset into ``directory``; on any exception remove all temp files, re-raise.

    The folder is locked for the whole preparation; temp files and download folders left
    by a killed preparation are removed first."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(directory, "zsharp download").__enter__()
    except BusyError as error:
        raise DatasetError(f"being prepared by another process: {error}") from None
    except OSError as error:
        raise named(error, directory) from error
    try:
        remove_stale_temps(directory)
        for stale in directory.glob(".downloads-*"):
            shutil.rmtree(stale, ignore_errors=True)
        # A READY left from an older preparation must not vouch for the new files.
        (directory / READY_FILE).unlink(missing_ok=True)
        stage = Staging(directory)
        try:
            yield stage
        except BaseException:
            stage.abort()
            raise
    finally:
        lock.__exit__(None, None, None)


def check_prepared(directory: str | os.PathLike[str], *, digests: bool = True) -> str | None:
    """None if ``directory`` holds a prepared dataset whose files match its meta.json, else
    why not (READY is then withdrawn: the dataset counts as not prepared)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
        if not isinstance(meta, dict):
            raise CorruptDatasetError(f"{directory / META_FILE}: not a JSON object")
        verify_prepared(directory, meta, digests=digests)
    except (OSError, UnicodeDecodeError, ValueError, CorruptDatasetError) as error:
        _withdraw(directory)
        return " ".join(str(error).split())
    return None


def _withdraw(directory: Path) -> None:
    """Remove READY: the files no longer vouch for a prepared dataset (the next
    ``zsharp download`` prepares it again). Open memory maps of other readers stay valid."""
    with contextlib.suppress(OSError):
        (directory / READY_FILE).unlink(missing_ok=True)


def load_prepared(
    name: str, root: str | os.PathLike[str], *, mmap: bool = True, verify: bool = True
) -> Prepared:
    """Load a dataset prepared by :func:`zsharp.data.download_dataset`.

    Args:
        name: registry name (``cifar10``, ``cifar100``, ``svhn``, ``tiny-imagenet``, ``digits``).
        root: the data root given to ``download_dataset`` (the data is in ``root/<name>``).
        mmap: memory-map the image arrays (copy-on-write) instead of reading them, so that
            opening Tiny-ImageNet is instant and pages are read as they are used.
        verify: check the arrays against meta.json first (:func:`verify_prepared`).

    Raises:
        DatasetNotReadyError: the data is missing or incompletely prepared.
        CorruptDatasetError: (a DatasetNotReadyError) a file does not match meta.json; READY
            is withdrawn, so the dataset counts as not prepared from now on.
    """
    spec = get_spec(name)
    directory = dataset_dir(root, name)
    if not is_ready(directory):
        raise DatasetNotReadyError(
            f"dataset {spec.name!r} is not prepared in {directory} (no {READY_FILE} marker); "
            f"run `zsharp download {spec.name} --root {Path(root)}` first"
        )
    again = f"zsharp download {spec.name} --root {Path(root)}"
    try:
        meta = json.loads((directory / META_FILE).read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        _withdraw(directory)
        raise CorruptDatasetError(
            f"{directory / META_FILE}: unreadable ({' '.join(str(error).split())[:120]}); "
            f"prepare the dataset again: {again}"
        ) from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DatasetNotReadyError(
            f"{directory / META_FILE}: format version {meta.get('format_version')} is not "
            f"{FORMAT_VERSION}; delete {directory} and run `{again}` again"
        )
    if verify:
        try:
            verify_prepared(directory, meta)
        except CorruptDatasetError as error:
            _withdraw(directory)
            raise CorruptDatasetError(f"{error}; prepare the dataset again: {again}") from None
    arrays = {
        key: _load_array(directory / f"{key}.npy", mmap=mmap and key.endswith("_x"))
        for key in ARRAYS
    }
    return Prepared(
        **arrays,
        num_classes=int(meta["num_classes"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        image_size=int(meta["image_size"]),
        channels=int(meta["channels"]),
        name=spec.name,
        class_names=tuple(meta.get("class_names", ())),
        meta=meta,
    )


def _load_array(path: Path, *, mmap: bool) -> torch.Tensor:
    if not path.is_file():
        raise DatasetNotReadyError(
            f"{path}: missing although {READY_FILE} exists; delete the "
            "directory and prepare the dataset again"
        )
    # 'c' (copy-on-write) maps the file like 'r' but yields a writable array, which
    # torch.from_numpy needs to avoid its non-writable-array warning.
    array = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    return torch.from_numpy(array)
