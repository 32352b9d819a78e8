"""zsharp.data: the registry, download-and-prepare on tiny upstream-format archives, loaders.

No test touches the internet: archives are built by ``tests/archives.py`` and served from a
file path, a ``file://`` URL or an HTTP server on 127.0.0.1 run by the test itself.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from scipy.io import loadmat
from torchvision.transforms.v2 import functional as tvf

import zsharp.data
from tests.archives import (
    Archive,
    make_archive,
    make_cifar10,
    make_svhn,
    make_tiny_imagenet,
    md5_of,
    replace_tar_member,
    serve_directory,
    truncated_copy,
)
from zsharp.data import (
    DATASETS,
    ChecksumError,
    CorruptArchiveError,
    DatasetError,
    DatasetNotReadyError,
    DatasetSpec,
    DeviceLoader,
    RemoteFile,
    crop_flip,
    download_dataset,
    embedded_digits,
    eval_loader,
    get_spec,
    load_prepared,
    register_dataset,
    train_loader,
)
from zsharp.data.prepared import Staging, channel_stats

NETWORK_DATASETS = ["cifar10", "cifar100", "svhn", "tiny-imagenet"]
SPLIT_KEYS = ("train_x", "train_y", "test_x", "test_y")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a URL fail loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _source(archive: Archive, name: str, kind: str, base_url: str | None = None) -> str | Path:
    """The ``source`` argument for one of the three ways of pointing at the archive."""
    several = name == "svhn"  # two files: the source is their folder / base URL
    if kind == "path":
        return archive.directory if several else archive.path
    if kind == "file_url":
        return archive.directory.as_uri() + "/" if several else archive.path.as_uri()
    assert base_url is not None
    return base_url if several else base_url + archive.path.name


def _assert_nothing_published(directory: Path) -> None:
    """No READY, no arrays, no temp files, no download leftovers."""
    leftovers = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    assert leftovers == []


def _assert_one_line_naming(exc: BaseException, filename: str) -> None:
    message = str(exc)
    assert "\n" not in message
    assert filename in message


# --------------------------------------------------------------------------- download


@pytest.mark.parametrize("kind", ["path", "file_url", "http"])
@pytest.mark.parametrize("name", NETWORK_DATASETS)
def test_download_prepares_upstream_pixels_and_labels(tmp_path: Path, name: str, kind: str) -> None:
    archive = make_archive(name, tmp_path / "upstream")
    root = tmp_path / "root"
    if kind == "http":
        with serve_directory(archive.directory) as base_url:
            out = download_dataset(
                name, root, _source(archive, name, kind, base_url), md5=archive.md5, progress=False
            )
    else:
        out = download_dataset(
            name, root, _source(archive, name, kind), md5=archive.md5, progress=False
        )
    assert out == root / name
    assert sorted(p.name for p in out.iterdir()) == [
        "READY",
        "meta.json",
        "test_x.npy",
        "test_y.npy",
        "train_x.npy",
        "train_y.npy",
    ]
    data = load_prepared(name, root)
    for key in SPLIT_KEYS:
        # Exact for every format: for JPEG, the expected arrays are PIL's decode of the
        # very bytes in the zip, which is what the parser must produce too.
        np.testing.assert_array_equal(getattr(data, key).numpy(), getattr(archive, key), key)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert list(data.class_names) == archive.class_names
    assert data.num_classes == len(archive.class_names)
    assert data.channels == 3 and data.image_size == DATASETS[name].image_size
    mean, std = channel_stats(archive.train_x)
    assert data.mean == pytest.approx(mean) and data.std == pytest.approx(std)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == {"train": len(archive.train_y), "test": len(archive.test_y)}
    assert meta["source"]["files"] == archive.md5 and meta["source"]["verified"] is True


def test_svhn_label_10_becomes_0(tmp_path: Path) -> None:
    archive = make_svhn(tmp_path / "upstream", n_train=20)
    download_dataset("svhn", tmp_path / "root", archive.directory, md5=archive.md5)
    upstream = loadmat(archive.files["train_32x32.mat"])["y"].reshape(-1)
    assert 10 in upstream and 0 not in upstream
    labels = load_prepared("svhn", tmp_path / "root").train_y.numpy()
    np.testing.assert_array_equal(labels, np.where(upstream == 10, 0, upstream))


def test_tiny_imagenet_val_regrouped_by_annotations(tmp_path: Path) -> None:
    archive = make_tiny_imagenet(tmp_path / "upstream", val_per_class=3)
    download_dataset("tiny-imagenet", tmp_path / "root", archive.path, md5=archive.md5)
    data = load_prepared("tiny-imagenet", tmp_path / "root")
    wnids = sorted(archive.class_names)
    # Labels index the *sorted* wnids, whatever order wnids.txt lists them in.
    assert list(data.class_names) == wnids
    with zipfile.ZipFile(archive.path) as zf:
        listed = zf.read("tiny-imagenet-200/wnids.txt").decode().split()
        lines = zf.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()
    assert listed != wnids  # the test archive really exercises the mapping
    by_class = sorted((wnids.index(line.split("\t")[1]), line.split("\t")[0]) for line in lines)
    assert data.test_y.tolist() == [label for label, _ in by_class]
    assert np.bincount(data.test_y.numpy()).tolist() == [3, 3, 3]


def test_wrong_checksum_rejected_and_nothing_published(tmp_path: Path) -> None:
    archive = make_cifar10(tmp_path / "upstream")
    with pytest.raises(ChecksumError) as info:
        # No md5 override: the real published CIFAR-10 checksum applies and must fail.
        download_dataset("cifar10", tmp_path / "root", archive.path)
    _assert_one_line_naming(info.value, "cifar-10-python.tar.gz")
    assert tvd.CIFAR10.tgz_md5 in str(info.value)
    _assert_nothing_published(tmp_path / "root" / "cifar10")
    assert archive.path.exists()  # a user's own file is never deleted


def test_wrong_checksum_over_http_removes_download(tmp_path: Path) -> None:
    archive = make_svhn(tmp_path / "upstream")
    wrong = {**archive.md5, "test_32x32.mat": "0" * 32}
    with serve_directory(archive.directory) as base_url, pytest.raises(ChecksumError) as info:
        download_dataset("svhn", tmp_path / "root", base_url, md5=wrong, progress=False)
    _assert_one_line_naming(info.value, "test_32x32.mat")
    _assert_nothing_published(tmp_path / "root" / "svhn")


@pytest.mark.parametrize("name", NETWORK_DATASETS)
def test_truncated_archive_rejected(tmp_path: Path, name: str) -> None:
    archive = make_archive(name, tmp_path / "upstream")
    broken = tmp_path / "broken"
    for path in archive.files.values():
        truncated_copy(path, broken)
    source = broken if name == "svhn" else broken / archive.path.name
    victim = next(iter(archive.files))
    # With verification the md5 catches it ...
    with pytest.raises(ChecksumError) as info:
        download_dataset(name, tmp_path / "root", source, md5=archive.md5)
    _assert_one_line_naming(info.value, victim)
    _assert_nothing_published(tmp_path / "root" / name)
    # ... and without, the parser does, with a clear error rather than a traceback.
    with pytest.raises(CorruptArchiveError) as info:
        download_dataset(name, tmp_path / "root", source, verify=False)
    _assert_one_line_naming(info.value, victim)
    _assert_nothing_published(tmp_path / "root" / name)


def test_failure_after_arrays_were_staged_leaves_no_partial_files(tmp_path: Path) -> None:
    """A bad val JPEG is found after all train images were written to temp files."""
    archive = make_tiny_imagenet(tmp_path / "upstream")
    bad = tmp_path / "bad" / archive.path.name
    bad.parent.mkdir()
    with zipfile.ZipFile(archive.path) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("val/images/val_1.JPEG"):
                data = b"not a jpeg"
            dst.writestr(item, data)
    with pytest.raises(CorruptArchiveError) as info:
        download_dataset("tiny-imagenet", tmp_path / "root", bad, verify=False)
    _assert_one_line_naming(info.value, "val_1.JPEG")
    _assert_nothing_published(tmp_path / "root" / "tiny-imagenet")


def test_download_cut_short_is_an_error(tmp_path: Path) -> None:
    archive = make_cifar10(tmp_path / "upstream")
    with (
        serve_directory(archive.directory, short_by=100) as base_url,
        pytest.raises(DatasetError, match="connection closed after"),
    ):
        download_dataset(
            "cifar10",
            tmp_path / "root",
            base_url + archive.path.name,
            md5=archive.md5,
            progress=False,
        )
    _assert_nothing_published(tmp_path / "root" / "cifar10")


def test_prepared_root_needs_no_network(tmp_path: Path, no_network: None) -> None:
    archive = make_cifar10(tmp_path / "upstream")
    root = tmp_path / "root"
    with serve_directory(archive.directory) as base_url:
        dead_url = base_url + archive.path.name
    download_dataset("cifar10", root, archive.path, md5=archive.md5)
    # The server is gone and urlopen refuses: a prepared root must still just return.
    assert download_dataset("cifar10", root, dead_url) == root / "cifar10"
    assert download_dataset("cifar10", root) == root / "cifar10"


def test_second_call_after_http_download_skips_the_stopped_server(tmp_path: Path) -> None:
    archive = make_svhn(tmp_path / "upstream")
    root = tmp_path / "root"
    with serve_directory(archive.directory) as base_url:
        download_dataset("svhn", root, base_url, md5=archive.md5, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (root / "svhn").iterdir()}
    assert download_dataset("svhn", root, base_url, md5=archive.md5) == root / "svhn"
    assert {p.name: p.stat().st_mtime_ns for p in (root / "svhn").iterdir()} == before


def test_digits_offline(tmp_path: Path, no_network: None) -> None:
    out = download_dataset("digits", tmp_path)
    data = load_prepared("digits", tmp_path)
    assert (len(data.train_y), len(data.test_y)) == (1437, 360)
    assert data.train_x.shape[1:] == (1, 8, 8) and data.train_x.dtype == torch.uint8
    assert int(data.train_x.max()) == 255 and int(data.train_x.min()) == 0
    # Stratified: every class is ~20 % test.
    fractions = np.bincount(data.test_y.numpy()) / np.bincount(
        np.concatenate([data.train_y.numpy(), data.test_y.numpy()])
    )
    assert np.allclose(fractions, 0.2, atol=0.02)
    split = json.loads((out / "meta.json").read_text())["split"]
    assert sorted(split["train_index"] + split["test_index"]) == list(range(1797))
    embedded = embedded_digits()
    for key in SPLIT_KEYS:
        assert torch.equal(getattr(data, key), getattr(embedded, key))
    assert data.mean == pytest.approx(embedded.mean)
    assert data.mean == pytest.approx(DATASETS["digits"].mean, abs=1e-4)
    with pytest.raises(ValueError, match="takes no source"):
        download_dataset("digits", tmp_path / "other", "http://127.0.0.1:9/x")


def test_tampered_cifar_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    """torchvision's CIFAR10 uses plain pickle.load; ours must not run a tampered batch."""
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    archive = make_cifar10(tmp_path / "upstream")
    evil = replace_tar_member(
        archive.path,
        tmp_path / "evil",
        "cifar-10-batches-py/data_batch_1",
        pickle.dumps({b"data": Payload()}, protocol=2),
    )
    with pytest.raises(CorruptArchiveError, match=r"refusing to unpickle global") as info:
        download_dataset("cifar10", tmp_path / "root", evil, verify=False)
    _assert_one_line_naming(info.value, "cifar-10-python.tar.gz")
    assert not marker.exists()
    _assert_nothing_published(tmp_path / "root" / "cifar10")
    # With verification (the default) the md5 refuses it before any byte is unpickled.
    with pytest.raises(ChecksumError):
        download_dataset("cifar10", tmp_path / "root", evil, md5=archive.md5)
    assert not marker.exists()


def test_load_unprepared_tells_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotReadyError, match=r"zsharp download cifar100 --root "):
        load_prepared("cifar100", tmp_path)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="known datasets"):
        download_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="not a cifar10 file"):
        download_dataset("cifar10", tmp_path, tmp_path, md5={"train_32x32.mat": "0" * 32})


# --------------------------------------------------------------------------- registry

# Tiny-ImageNet has no torchvision class. The URL and md5 that well-kept loaders publish:
# ContinualAI/avalanche, avalanche/benchmarks/datasets/tiny_imagenet/tiny_imagenet.py
# (TinyImagenet.filename, .md5) and ENSTA-U2IS-AI/torch-uncertainty,
# torch_uncertainty/datasets/classification/imagenet/tiny_imagenet.py (TinyImageNet.url,
# .tgz_md5). Held here, not imported from the registry, so the test compares two sources.
PUBLISHED_TINY_IMAGENET = RemoteFile(
    "tiny-imagenet-200.zip",
    "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    "90528d7ca1a48142e341f4ef8d21d0de",
)
# Every remote constant zsharp.data may hold, with the authority it was checked against.
HELD_CONSTANTS = {"tiny-imagenet": (PUBLISHED_TINY_IMAGENET,)}


def _torchvision_files(name: str) -> tuple[RemoteFile, ...]:
    """The authority for the datasets torchvision has, read straight off its classes."""
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        return (RemoteFile(cls.filename, cls.url, cls.tgz_md5),)
    assert name == "svhn"
    return tuple(
        RemoteFile(filename, url, md5)
        for url, filename, md5 in (tvd.SVHN.split_list[s] for s in ("train", "test"))
    )


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_torchvision_datasets_take_their_constants_from_torchvision(name: str) -> None:
    spec = get_spec(name)
    assert spec.files == () and spec.files_from is not None  # no copy held to drift
    assert spec.remote_files() == _torchvision_files(name)


def test_svhn_test_checksum_is_the_published_one() -> None:
    """Issue 16: the registry once held eb5a983be6a315427106f7b3d7f46d6c, a typo."""
    test_file = get_spec("svhn").remote_files()[1]
    assert test_file.filename == "test_32x32.mat"
    assert test_file.md5 == "eb5a983be6a315427106f1b164d9cef3"


def test_every_held_remote_constant_matches_its_authority() -> None:
    held = {name: spec.files for name, spec in DATASETS.items() if spec.files}
    assert held == HELD_CONSTANTS
    # No md5 or URL is written anywhere else in zsharp.data (a copied torchvision value
    # would show up here), so the registry entries above are all there is to check.
    authority = {f.md5 for files in HELD_CONSTANTS.values() for f in files}
    authority |= {f.url for files in HELD_CONSTANTS.values() for f in files}
    package = Path(zsharp.data.__file__).parent
    literals = re.compile(r"\b[0-9a-f]{32}\b|[a-z]+://[^\s'\"`]+")
    for path in sorted(package.glob("*.py")):
        found = set(literals.findall(path.read_text()))
        assert found <= authority, f"{path.name} holds {sorted(found - authority)}"


def test_registry_imports_without_torch() -> None:
    code = (
        "import sys, zsharp.data.registry\n"
        "from zsharp.data import DATASETS, get_spec, register_dataset\n"
        "assert get_spec('Tiny_ImageNet').defaults['epochs'] == 200\n"
        "assert get_spec('svhn').needs_network and not get_spec('digits').needs_network\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_torchvision_path_serves_the_test_archives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Point torchvision's own class at a test archive: it and we must read the same data.

    With no ``source`` and no ``md5`` given, ``download_dataset`` must find the archive
    through the patched torchvision class (its constants are read at run time, not copied);
    torchvision's own download, md5 check, extraction and parser then read the same file,
    which also checks that tests/archives.py writes the real upstream format.
    """
    archive = make_archive(name, tmp_path / "upstream")
    splits: dict[str, Any] = {}
    # Over HTTP: torchvision's downloader cannot read file:// URLs (no response.length).
    with serve_directory(archive.directory) as base_url:
        if name == "svhn":
            table = {
                split: [base_url + f"{split}_32x32.mat", f"{split}_32x32.mat", archive.md5[f]]
                for split in ("train", "test")
                for f in [f"{split}_32x32.mat"]
            }
            monkeypatch.setattr(tvd.SVHN, "split_list", table)
            for split in ("train", "test"):
                theirs = tvd.SVHN(tmp_path / "tv", split=split, download=True)
                splits[split] = (theirs.data, theirs.labels)
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            monkeypatch.setattr(cls, "url", base_url + archive.path.name)
            monkeypatch.setattr(cls, "tgz_md5", archive.md5[archive.path.name])
            # torchvision also checks each extracted batch against the real batches' md5s,
            # which a tiny archive cannot match: keep only its check that the batch exists.
            for attr in ("train_list", "test_list"):
                monkeypatch.setattr(cls, attr, [[f, None] for f, _ in getattr(cls, attr)])
            monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})
            for split in ("train", "test"):
                theirs = cls(tmp_path / "tv", train=split == "train", download=True)
                # torchvision returns N×H×W×C; the prepared arrays are N×C×H×W.
                splits[split] = (theirs.data.transpose(0, 3, 1, 2), theirs.targets)
            assert theirs.classes == archive.class_names
        out = download_dataset(name, tmp_path / "root", progress=False)
    ours = load_prepared(name, out.parent)
    for split, (x, y) in splits.items():
        np.testing.assert_array_equal(getattr(ours, f"{split}_x").numpy(), x, split)
        np.testing.assert_array_equal(getattr(ours, f"{split}_y").numpy(), np.asarray(y), split)
        np.testing.assert_array_equal(x, getattr(archive, f"{split}_x"), split)
    meta = json.loads((tmp_path / "root" / name / "meta.json").read_text())
    assert meta["source"] == {"files": archive.md5, "verified": True, "origin": "upstream"}


# A dataset defined entirely in test code: registering its spec is all it takes.


def prepare_toy(files: Mapping[str, Path], stage: Staging) -> dict[str, Any]:
    """Stage 12 train and 4 test 2×4×4 images whose pixels encode their index."""
    assert files == {}
    for split, n in (("train", 12), ("test", 4)):
        x = np.arange(n * 32, dtype=np.int64).reshape(n, 2, 4, 4) % 256
        stage.save(split, x.astype(np.uint8), np.arange(n) % 3)
    return {"num_classes": 3, "class_names": ["a", "b", "c"], "label_mapping": "index mod 3"}


def prepare_toy_npz(files: Mapping[str, Path], stage: Staging) -> dict[str, Any]:
    """Stage the splits stored in the dataset's one upstream file, ``toy.npz``."""
    with np.load(files["toy.npz"], allow_pickle=False) as arrays:
        for split in ("train", "test"):
            stage.save(split, arrays[f"{split}_x"], arrays[f"{split}_y"])
    return {"num_classes": 3, "class_names": ["a", "b", "c"], "label_mapping": "as stored"}


def _toy_spec(**changes: Any) -> DatasetSpec:
    fields: dict[str, Any] = {
        "name": "toy",
        "num_classes": 3,
        "image_size": 4,
        "channels": 2,
        "mean": (0.5, 0.5),
        "std": (0.25, 0.25),
        "prepare": "tests.test_data:prepare_toy",
        "defaults": {"epochs": 2, "flip": False},
        "aliases": ("toy_set",),
    }
    return DatasetSpec(**{**fields, **changes})


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Names registered by the test; removed afterwards so no other test sees them."""
    names: list[str] = []
    yield names
    for name in names:
        DATASETS.pop(name, None)


def test_a_registered_dataset_without_files_downloads_and_loads(
    tmp_path: Path, registered: list[str], no_network: None
) -> None:
    spec = register_dataset(_toy_spec())
    registered.append(spec.name)
    assert get_spec("TOY-SET") is spec and get_spec("toy") is spec
    out = download_dataset("toy", tmp_path)
    assert out == tmp_path / "toy" and (out / "READY").is_file()
    data = load_prepared("toy_set", tmp_path)
    expected = np.arange(12 * 32).reshape(12, 2, 4, 4) % 256
    np.testing.assert_array_equal(data.train_x.numpy(), expected)
    assert data.train_y.tolist() == [i % 3 for i in range(12)]
    assert (data.num_classes, data.channels, data.image_size) == (3, 2, 4)
    assert data.class_names == ("a", "b", "c") and data.meta["label_mapping"] == "index mod 3"
    with pytest.raises(ValueError, match=r"toy has no remote files .* takes no source") as info:
        download_dataset("toy", tmp_path / "other", tmp_path)
    assert isinstance(info.value, DatasetError)  # so the command line prints one line
    with pytest.raises(ValueError, match="not a toy file"):
        download_dataset("toy", tmp_path / "other", md5={"toy.npz": "0" * 32})


def test_a_registered_dataset_lists_its_own_remote_files(
    tmp_path: Path, registered: list[str]
) -> None:
    rng = np.random.default_rng(0)
    upstream = tmp_path / "upstream" / "toy.npz"
    upstream.parent.mkdir()
    arrays = {
        "train_x": rng.integers(0, 256, (6, 2, 4, 4), dtype=np.uint8),
        "train_y": np.arange(6) % 3,
        "test_x": rng.integers(0, 256, (3, 2, 4, 4), dtype=np.uint8),
        "test_y": np.arange(3),
    }
    np.savez(upstream, **arrays)
    with serve_directory(upstream.parent) as base_url:
        dead_url = base_url + "toy.npz"  # the server is gone: refused, never the internet
    published = RemoteFile("toy.npz", dead_url, md5_of(upstream))
    spec = _toy_spec(files=(published,), prepare="tests.test_data:prepare_toy_npz", aliases=())
    registered.append(register_dataset(spec).name)
    with pytest.raises(DatasetError, match=f"could not download {re.escape(dead_url)}"):
        download_dataset("toy", tmp_path / "root", progress=False)  # the published URL
    _assert_nothing_published(tmp_path / "root" / "toy")
    download_dataset("toy", tmp_path / "root", upstream.parent)  # a local mirror folder
    data = load_prepared("toy", tmp_path / "root")
    for key, value in arrays.items():
        np.testing.assert_array_equal(getattr(data, key).numpy(), value, key)
    assert data.meta["source"]["files"] == {"toy.npz": published.md5}


def test_register_dataset_refuses_duplicates_and_bad_specs(
    tmp_path: Path, registered: list[str]
) -> None:
    with pytest.raises(ValueError, match="'cifar10' is already registered"):
        register_dataset(_toy_spec(name="cifar10"))
    with pytest.raises(ValueError, match="'tinyimagenet' is already registered"):
        register_dataset(_toy_spec(aliases=("TinyImageNet",)))
    assert "toy" not in DATASETS
    with pytest.raises(ValueError, match="lower case"):
        _toy_spec(name="Toy_Set")
    with pytest.raises(ValueError, match="prepare must be 'module:function'"):
        _toy_spec(prepare="tests.test_data.prepare_toy")
    with pytest.raises(ValueError, match="not both"):
        _toy_spec(files=(PUBLISHED_TINY_IMAGENET,), files_from="zsharp.data.formats:svhn_files")
    registered.append(register_dataset(_toy_spec(prepare="tests.test_data:no_such")).name)
    with pytest.raises(ImportError, match="has no 'no_such'"):
        download_dataset("toy", tmp_path)
    assert not (tmp_path / "toy").exists()  # refused before anything was staged


def test_defaults_are_cell_settings_and_read_only() -> None:
    from zsharp.pipeline.cell.config import CellConfig

    settings = {f.name for f in dataclasses.fields(CellConfig)}
    for spec in DATASETS.values():
        assert set(spec.defaults) <= settings, spec.name
    assert get_spec("svhn").defaults["flip"] is False  # a mirrored digit is another digit
    assert get_spec("digits").defaults["epochs"] == 15
    spec = get_spec("cifar10")
    with pytest.raises(TypeError, match="read-only"):
        spec.defaults["lr"] = 1.0  # type: ignore[index]
    # Still a plain dict to json, pickle, copy and asdict (a MappingProxyType is not).
    assert json.loads(json.dumps(spec.defaults)) == dict(spec.defaults)
    assert pickle.loads(pickle.dumps(spec)) == spec == copy.deepcopy(spec)
    assert dataclasses.asdict(spec)["defaults"] == dict(spec.defaults)


# --------------------------------------------------------------------------- loader


def _random_split(n: int = 50, channels: int = 3, size: int = 32) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(123)
    x = torch.randint(0, 256, (n, channels, size, size), generator=generator, dtype=torch.uint8)
    return x, torch.arange(n) % 10


MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _loader(x: torch.Tensor, y: torch.Tensor, **kwargs: object) -> DeviceLoader:
    options = {"batch_size": 16, "mean": MEAN, "std": STD, "augment": True, "seed": 7}
    options.update(kwargs)
    return DeviceLoader(x, y, **options)  # type: ignore[arg-type]


def _epoch(loader: DeviceLoader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader.set_epoch(epoch)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_same_seed_and_epoch_give_identical_batches_even_after_resume() -> None:
    x, y = _random_split()
    first = _loader(x, y)
    a = _epoch(first, 3)
    b = _epoch(first, 3)
    resumed = _epoch(_loader(x, y), 3)  # a fresh object, as after loading a checkpoint
    for other in (b, resumed):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])


def test_different_epoch_or_seed_changes_order_and_augmentation() -> None:
    x, y = _random_split()
    loader = _loader(x, y)
    plans = [loader.plan(0), loader.plan(1), _loader(x, y, seed=8).plan(0)]
    for other in plans[1:]:
        assert not torch.equal(plans[0].order, other.order)
        assert not torch.equal(plans[0].crop_x, other.crop_x)


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_per_epoch(drop_last: bool) -> None:
    x, _ = _random_split(50)
    ids = torch.arange(50)  # labels that identify samples
    loader = _loader(x, ids, drop_last=drop_last)
    assert len(loader) == (3 if drop_last else 4)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = [yb for _, yb in loader]
        assert [len(b) for b in batches] == ([16] * 3 if drop_last else [16, 16, 16, 2])
        seen = torch.cat(batches).tolist()
        assert len(set(seen)) == len(seen)
        if not drop_last:
            assert sorted(seen) == list(range(50))


def _reference_sample(img: np.ndarray, top: int, left: int, flip: bool, pad: int) -> np.ndarray:
    """Zero-pad, cut, mirror: one sample, the slow obvious way."""
    _, h, w = img.shape
    padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
    crop = padded[:, top : top + h, left : left + w]
    return crop[:, :, ::-1] if flip else crop


def test_crop_and_flip_match_per_sample_references() -> None:
    x, y = _random_split(40, size=12)
    loader = _loader(x, y, batch_size=16)
    loader.set_epoch(5)
    plan = loader.plan()
    assert plan.crop_y is not None and plan.crop_x is not None and plan.flip is not None
    assert set(plan.crop_y.tolist()) <= set(range(9)) and plan.flip.any() and not plan.flip.all()
    served = torch.cat([xb for xb, _ in loader])
    scale = torch.tensor(STD).view(3, 1, 1)
    shift = torch.tensor(MEAN).view(3, 1, 1)
    for pos in range(len(y)):
        i = int(plan.order[pos])
        top, left, flip = int(plan.crop_y[pos]), int(plan.crop_x[pos]), bool(plan.flip[pos])
        expected = _reference_sample(x[i].numpy(), top, left, flip, pad=4)
        # The same semantics in torchvision's own ops (RandomCrop(padding=4) + flip).
        tv = tvf.crop(tvf.pad(x[i], [4]), top, left, 12, 12)
        tv = tvf.horizontal_flip(tv) if flip else tv
        np.testing.assert_array_equal(tv.numpy(), expected)
        normalised = (torch.from_numpy(expected.copy()).float() / 255 - shift) / scale
        torch.testing.assert_close(served[pos], normalised, atol=1e-5, rtol=0)


def test_crop_flip_on_its_own_is_exact_on_bytes() -> None:
    x, _ = _random_split(6, size=8)
    top = torch.tensor([0, 8, 4, 2, 7, 4])
    left = torch.tensor([8, 0, 4, 5, 1, 4])
    flip = torch.tensor([False, True, False, True, True, False])
    out = crop_flip(x, top, left, flip, padding=4)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for k in range(6):
        ref = _reference_sample(x[k].numpy(), int(top[k]), int(left[k]), bool(flip[k]), 4)
        np.testing.assert_array_equal(out[k].numpy(), ref)
    assert torch.equal(out[5], x[5])  # centre crop, no flip: the identity


def test_eval_loader_normalises_in_order() -> None:
    data = embedded_digits()
    loader = eval_loader(data, 100)
    assert len(loader) == 4
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(y, data.test_y)
    expected = (data.test_x.float() / 255 - data.mean[0]) / data.std[0]
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    # The train split normalised with its own stats has mean 0 and std 1.
    train = torch.cat([xb for xb, _ in eval_loader(data, 512, split="train")])
    assert abs(train.mean().item()) < 1e-4 and abs(train.std().item() - 1) < 1e-3


def test_train_loader_options() -> None:
    data = embedded_digits()
    loader = train_loader(data, 64, seed=1, padding=2, channels_last=True, dtype=torch.bfloat16)
    xb, yb = next(iter(loader))
    assert xb.dtype == torch.bfloat16 and yb.dtype == torch.int64 and xb.shape == (64, 1, 8, 8)
    assert xb.is_contiguous(memory_format=torch.channels_last)
    unaugmented = train_loader(data, 64, seed=1, augment=False)
    assert unaugmented.plan().crop_x is None
    # Same seed: same order whether or not augmentation draws follow the permutation.
    assert torch.equal(unaugmented.plan().order, loader.plan().order)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(data.train_x.float(), data.train_y, batch_size=4, mean=(0,), std=(1,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches() -> None:
    x, y = _random_split()
    cpu = _epoch(_loader(x, y), 2)
    cuda = _epoch(_loader(x, y, device="cuda"), 2)
    assert cuda[0].is_cuda
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], atol=1e-6, rtol=0)
    assert torch.equal(cuda[1].cpu(), cpu[1])
