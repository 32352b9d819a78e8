"""``download_dataset``: fetch, check, parse and publish a dataset in the prepared format."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from zsharp.data.digits import prepare_digits
from zsharp.data.fetch import fetch, resolve_source, verify_md5
from zsharp.data.formats import PARSERS
from zsharp.data.prepared import dataset_dir, is_ready, staging
from zsharp.data.registry import DatasetSpec, get_spec

__all__ = ["download_dataset"]


def download_dataset(
    name: str,
    root: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    md5: Mapping[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Fetch and prepare dataset ``name`` into ``root/<name>/``; return that directory.

    If the directory already holds prepared data (its READY marker exists) this returns at
    once without touching ``source`` or the network, so data staged on a cluster node
    without internet is simply reused.

    Args:
        name: ``cifar10``, ``cifar100``, ``svhn``, ``tiny-imagenet`` or ``digits``.
        root: data root; the dataset goes into ``root/<name>``.
        source: where the upstream files are instead of their published URLs: a URL
            (http, https, ftp, file) or a local path, naming the archive itself or a
            base/directory that holds it under its upstream name. SVHN's two ``.mat`` files
            always need a base. Must be ``None`` for ``digits`` (bundled with scikit-learn).
        verify: check each upstream file's md5 before parsing it.
        md5: expected md5 per upstream file name (e.g. ``{"cifar-10-python.tar.gz": "…"}``),
            overriding the published values; for mirrors of other releases and for tests.
        progress: show a tqdm bar while downloading (hidden anyway when not on a terminal).

    Raises:
        zsharp.data.ChecksumError: a file's md5 differs from the expected one.
        zsharp.data.CorruptArchiveError: a file cannot be parsed (truncated, corrupt, other
            layout).
        zsharp.data.DatasetError: a file cannot be found or downloaded.
        KeyError: unknown dataset name; ValueError: bad ``md5``/``source`` argument.

    On any error nothing is published: no READY, no arrays under their final names, and
    downloaded files are removed.
    """
    spec = get_spec(name)
    directory = dataset_dir(root, name)
    if is_ready(directory):
        return directory
    if not spec.needs_network:
        if source is not None:
            raise ValueError(f"{spec.name} ships with scikit-learn and takes no source")
        with staging(directory) as stage:
            stage.commit({"name": spec.name, **prepare_digits(stage)})
        return directory
    expected = _expected_md5(spec, md5)
    # Per process, so two jobs preparing the same dataset cannot write the same .part file.
    workdir = directory / f".downloads-{os.getpid()}"
    try:
        with staging(directory) as stage:
            files: dict[str, Path] = {}
            sums: dict[str, str] = {}
            for remote in spec.files:
                location = resolve_source(remote, source, several=len(spec.files) > 1)
                path, digest = fetch(location, workdir, progress=progress)
                if verify:
                    verify_md5(path, digest, expected[remote.filename])
                files[remote.filename], sums[remote.filename] = path, digest
            parsed = PARSERS[spec.name](files, stage)
            stage.commit(
                {
                    "name": spec.name,
                    **parsed,
                    "source": {"files": sums, "verified": verify, "origin": _origin(source)},
                }
            )
    finally:
        # The archives are not kept: the prepared arrays hold everything needed.
        shutil.rmtree(workdir, ignore_errors=True)
    return directory


def _expected_md5(spec: DatasetSpec, overrides: Mapping[str, str] | None) -> dict[str, str]:
    expected = {remote.filename: remote.md5 for remote in spec.files}
    unknown = sorted(set(overrides or {}) - set(expected))
    if unknown:
        raise ValueError(
            f"md5 given for {unknown[0]!r}, which is not a {spec.name} file "
            f"(its files: {', '.join(expected)})"
        )
    return {**expected, **(overrides or {})}


def _origin(source: str | os.PathLike[str] | None) -> str:
    return "upstream" if source is None else os.fspath(source)
