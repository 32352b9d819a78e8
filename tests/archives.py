"""Tiny dataset archives in the exact upstream formats, and a local HTTP server for them.

Each ``make_*`` function writes a few dozen images in the layout of the real upstream file
(CIFAR python pickles in a tar.gz, SVHN MATLAB v5 files, the Tiny-ImageNet zip) and returns
an :class:`Archive` with the pixels and labels a correct parser must produce, so tests can
run the real ``zsharp.data.download_dataset`` on them offline.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TINY_WNIDS",
    "Archive",
    "make_archive",
    "make_cifar10",
    "make_cifar100",
    "make_svhn",
    "make_tiny_imagenet",
    "md5_of",
    "replace_tar_member",
    "serve_directory",
    "truncated_copy",
]

CIFAR10_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Deliberately not in sorted order: the prepared labels follow sorted(wnids).
TINY_WNIDS = ("n09256479", "n01443537", "n04067472")


@dataclass
class Archive:
    """Files written for one dataset and the arrays a correct parser must return.

    Attributes:
        directory: the folder holding the files (a valid ``source`` for every dataset).
        files: upstream file name -> path.
        md5: upstream file name -> md5 of the file written.
        train_x, test_x: expected uint8 N×C×H×W images, in the prepared order.
        train_y, test_y: expected int64 labels.
        class_names: expected class names, by label.
    """

    directory: Path
    files: dict[str, Path]
    md5: dict[str, str]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]

    @property
    def path(self) -> Path:
        """The single file of a one-file dataset (not SVHN)."""
        (only,) = self.files.values()
        return only


def md5_of(path: Path) -> str:
    """Hex md5 of a file."""
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _archive(directory: Path, files: dict[str, Path], **arrays: Any) -> Archive:
    return Archive(
        directory=directory,
        files=files,
        md5={name: md5_of(path) for name, path in files.items()},
        **arrays,
    )


def _images(rng: np.random.Generator, n: int, channels: int = 3, size: int = 32) -> np.ndarray:
    return rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)


# --------------------------------------------------------------------------- CIFAR


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]  # the pure-Python one
    """Writes a protocol-2 pickle as Python 2's cPickle wrote the upstream CIFAR batches.

    Every ``str`` and ``bytes`` becomes a Python 2 ``str`` (the BINSTRING opcodes, where
    Python 3 would write BINUNICODE or a ``_codecs.encode`` call), and numpy lives under
    ``numpy.core``. Python 3 reads those strings back as bytes with ``encoding="bytes"`` (our
    parser) and as str with ``encoding="latin1"`` (torchvision's), exactly as it reads the
    real files; a plain ``pickle.dumps`` would give bytes keys under both and torchvision's
    reader would not find ``"data"``.
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_python2_str(self, obj: str | bytes) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str
    dispatch[str] = _save_python2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")  # numpy 1.x's name
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _pickle_py2_style(obj: dict[bytes, Any]) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _cifar_batch(x: np.ndarray, labels: np.ndarray, label_key: bytes, title: bytes) -> bytes:
    batch = {
        b"batch_label": title,
        label_key: [int(v) for v in labels],  # upstream labels are plain lists of ints
        b"data": x.reshape(len(x), 3072),  # rows: 1024 R, 1024 G, 1024 B values
        b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
    }
    return _pickle_py2_style(batch)


def make_cifar10(directory: Path, *, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> Archive:
    """``cifar-10-python.tar.gz``: ``cifar-10-batches-py/data_batch_1..5``, ``test_batch``."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    train_x = _images(rng, 5 * per_batch)
    train_y = rng.integers(0, 10, size=5 * per_batch).astype(np.int64)
    test_x, test_y = _images(rng, n_test), rng.integers(0, 10, size=n_test).astype(np.int64)
    path = directory / "cifar-10-python.tar.gz"
    top = "cifar-10-batches-py/"
    with tarfile.open(path, "w:gz") as tar:
        _add_dir(tar, top.rstrip("/"))
        meta = {
            b"num_cases_per_batch": per_batch,
            b"label_names": [n.encode() for n in CIFAR10_NAMES],
            b"num_vis": 3072,
        }
        _add_bytes(tar, top + "batches.meta", _pickle_py2_style(meta))
        for i in range(5):
            part = slice(i * per_batch, (i + 1) * per_batch)
            title = f"training batch {i + 1} of 5".encode()
            batch = _cifar_batch(train_x[part], train_y[part], b"labels", title)
            _add_bytes(tar, f"{top}data_batch_{i + 1}", batch)
        test = _cifar_batch(test_x, test_y, b"labels", b"testing batch 1 of 1")
        _add_bytes(tar, top + "test_batch", test)
        _add_bytes(tar, top + "readme.html", b"<html>tiny test archive</html>")
    return _archive(
        directory,
        {path.name: path},
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        class_names=list(CIFAR10_NAMES),
    )


def make_cifar100(directory: Path, *, n_train: int = 16, n_test: int = 6, seed: int = 0) -> Archive:
    """``cifar-100-python.tar.gz``: ``cifar-100-python/train``, ``test``, ``meta``."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    fine = [f"fine_{i:02d}" for i in range(100)]
    coarse = [f"coarse_{i:02d}" for i in range(20)]
    split_arrays = {}
    path = directory / "cifar-100-python.tar.gz"
    top = "cifar-100-python/"
    with tarfile.open(path, "w:gz") as tar:
        _add_dir(tar, top.rstrip("/"))
        meta = {
            b"fine_label_names": [n.encode() for n in fine],
            b"coarse_label_names": [n.encode() for n in coarse],
        }
        _add_bytes(tar, top + "meta", _pickle_py2_style(meta))
        for split, n in (("train", n_train), ("test", n_test)):
            x = _images(rng, n)
            fine_y = rng.integers(0, 100, size=n).astype(np.int64)
            batch = {
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": [int(v) for v in fine_y],
                b"coarse_labels": [int(v) // 5 for v in fine_y],
                b"data": x.reshape(n, 3072),
            }
            _add_bytes(tar, top + split, _pickle_py2_style(batch))
            split_arrays[split] = (x, fine_y)
    return _archive(
        directory,
        {path.name: path},
        train_x=split_arrays["train"][0],
        train_y=split_arrays["train"][1],
        test_x=split_arrays["test"][0],
        test_y=split_arrays["test"][1],
        class_names=fine,
    )


# --------------------------------------------------------------------------- SVHN


def make_svhn(directory: Path, *, n_train: int = 14, n_test: int = 9, seed: int = 0) -> Archive:
    """``train_32x32.mat`` and ``test_32x32.mat``: X 32×32×3×N uint8, y N×1 with 10 for 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files, arrays = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n)
        digits = np.arange(n) % 10  # every digit, 0 included, appears
        rng.shuffle(digits)
        upstream_y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        path = directory / f"{split}_32x32.mat"
        # Upstream layout is H×W×C×N: the inverse of the parser's (3, 2, 0, 1) transpose.
        savemat(path, {"X": np.transpose(x, (2, 3, 1, 0)), "y": upstream_y}, format="5")
        files[path.name] = path
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, digits.astype(np.int64)
    return _archive(directory, files, class_names=[str(d) for d in range(10)], **arrays)


# --------------------------------------------------------------------------- Tiny-ImageNet


def _jpeg(rng: np.random.Generator, grey: bool) -> bytes:
    from PIL import Image

    # Smooth gradients plus noise: realistic enough for JPEG, different per image.
    yy, xx = np.mgrid[0:64, 0:64]
    base = rng.integers(0, 128, size=3)
    pixels = np.stack([(base[c] + (c + 1) * (xx + yy) // 2) % 256 for c in range(3)], -1)
    pixels = (pixels + rng.integers(0, 30, size=pixels.shape)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if grey else pixels)  # 2-D: mode L, else RGB
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    """What PIL makes of a JPEG: 3×64×64 uint8 (grey expanded to RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy()


def make_tiny_imagenet(
    directory: Path,
    *,
    wnids: Sequence[str] = TINY_WNIDS,
    train_per_class: int = 3,
    val_per_class: int = 2,
    seed: int = 0,
) -> Archive:
    """``tiny-imagenet-200.zip`` with the upstream tree, a few images per class.

    wnids.txt is written in the given (unsorted) order; every class's first train image and
    every third val image is greyscale. Val images are named ``val_<k>.JPEG`` in shuffled
    class order, labelled only by ``val/val_annotations.txt``, as upstream.
    Expected order: by label (index in sorted wnids), then by member name.
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    label = {wnid: i for i, wnid in enumerate(sorted(wnids))}
    top = "tiny-imagenet-200/"
    entries: dict[str, bytes] = {
        top + "wnids.txt": "".join(f"{w}\n" for w in wnids).encode(),
        top + "words.txt": "".join(f"{w}\tthing {w}\n" for w in wnids).encode(),
    }
    train: list[tuple[str, int, bytes]] = []
    for wnid in wnids:
        boxes = []
        for i in range(train_per_class):
            name = f"{top}train/{wnid}/images/{wnid}_{i}.JPEG"
            data = _jpeg(rng, grey=i == 0)
            entries[name] = data
            train.append((name, label[wnid], data))
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
        entries[f"{top}train/{wnid}/{wnid}_boxes.txt"] = "".join(boxes).encode()
    val_wnids = [w for w in wnids for _ in range(val_per_class)]
    rng.shuffle(val_wnids)  # val/images mixes all classes
    val: list[tuple[str, int, bytes]] = []
    annotations = []
    for k, wnid in enumerate(val_wnids):
        name = f"{top}val/images/val_{k}.JPEG"
        data = _jpeg(rng, grey=k % 3 == 0)
        entries[name] = data
        val.append((name, label[wnid], data))
        annotations.append(f"val_{k}.JPEG\t{wnid}\t1\t2\t60\t61\n")
    entries[top + "val/val_annotations.txt"] = "".join(annotations).encode()
    entries[top + "test/images/test_0.JPEG"] = _jpeg(rng, grey=False)  # unlabelled upstream
    path = directory / "tiny-imagenet-200.zip"
    _write_zip(path, entries)
    train.sort(key=lambda item: (item[1], item[0]))
    val.sort(key=lambda item: (item[1], item[0]))
    return _archive(
        directory,
        {path.name: path},
        train_x=np.stack([_decode(data) for _, _, data in train]),
        train_y=np.array([lab for _, lab, _ in train], dtype=np.int64),
        test_x=np.stack([_decode(data) for _, _, data in val]),
        test_y=np.array([lab for _, lab, _ in val], dtype=np.int64),
        class_names=sorted(wnids),
    )


def _write_zip(path: Path, entries: dict[str, bytes]) -> None:
    """A zip with explicit directory entries, like the upstream one."""
    folders = sorted({name[: i + 1] for name in entries for i, c in enumerate(name) if c == "/"})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for folder in folders:
            zf.writestr(folder, b"")
        for name, data in entries.items():
            zf.writestr(name, data)


MAKERS = {
    "cifar10": make_cifar10,
    "cifar100": make_cifar100,
    "svhn": make_svhn,
    "tiny-imagenet": make_tiny_imagenet,
}


def make_archive(name: str, directory: Path, **kwargs: Any) -> Archive:
    """Build the tiny upstream-format file(s) for dataset ``name`` in ``directory``."""
    return MAKERS[name](directory, **kwargs)


# --------------------------------------------------------------------------- helpers


def truncated_copy(path: Path, directory: Path, fraction: float = 0.6) -> Path:
    """Copy the first ``fraction`` of ``path`` into ``directory`` under the same name."""
    data = path.read_bytes()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / path.name
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def replace_tar_member(path: Path, directory: Path, member: str, data: bytes) -> Path:
    """Copy the .tar.gz ``path`` into ``directory`` with ``member``'s bytes replaced by ``data``."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / path.name
    found = False
    with tarfile.open(path, "r:gz") as src, tarfile.open(target, "w:gz") as dst:
        for info in src:
            if info.name == member:
                found = True
                _add_bytes(dst, member, data)
            elif info.isfile():
                dst.addfile(info, src.extractfile(info))
            else:
                dst.addfile(info)
    if not found:
        raise KeyError(f"{path}: no member {member}")
    return target


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    timeout = 10  # seconds a stuck client may hold a handler thread
    short_by = 0  # bytes withheld from each body while still announcing the full length

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        if not self.short_by:
            super().copyfile(source, outputfile)
            return
        data = source.read()
        outputfile.write(data[: max(len(data) - self.short_by, 0)])
        self.close_connection = True


@contextmanager
def serve_directory(directory: Path, *, short_by: int = 0) -> Iterator[str]:
    """Serve ``directory`` on ``http://127.0.0.1:<free port>/`` from a thread.

    Yields the base URL (ending in ``/``); the server is shut down and its socket closed on
    exit. ``short_by`` > 0 makes every response stop that many bytes early after announcing
    the full Content-Length, to simulate a dropped connection.
    """
    handler = functools.partial(
        type("Handler", (_QuietHandler,), {"short_by": short_by}), directory=str(directory)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
