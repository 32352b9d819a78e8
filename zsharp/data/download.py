"""``download_dataset``: fetch, check, prepare and publish a dataset in the prepared format.

It knows no dataset by name: everything comes from the dataset's registry spec (its remote
files and its ``prepare`` function), so a registered spec is all a new dataset needs.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from zsharp.data.errors import DatasetArgumentError
from zsharp.data.fetch import fetch, resolve_source, verify_md5
from zsharp.data.prepared import check_prepared, dataset_dir, is_ready, staging
from zsharp.data.registry import RemoteFile, get_spec

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

    If the directory already holds prepared data (its READY marker exists) whose files match
    its ``meta.json`` (:func:`~zsharp.data.prepared.verify_prepared`, digests included), this
    returns without touching ``source`` or the network, so data staged on a cluster node
    without internet is simply reused; prepared data that does not match is prepared again
    (one line on stderr says why).

    Args:
        name: a registered dataset (``cifar10``, ``cifar100``, ``svhn``, ``tiny-imagenet``,
            ``digits``, or one added with :func:`zsharp.data.register_dataset`).
        root: data root; the dataset goes into ``root/<name>``.
        source: where the upstream files are instead of their published URLs: a URL
            (http, https, ftp, file) or a local path, naming the archive itself or a
            base/directory that holds it under its upstream name. SVHN's two ``.mat`` files
            always need a base. Must be ``None`` for a dataset with no remote files
            (``digits``, bundled with scikit-learn): it is prepared directly.
        verify: check each upstream file's md5 before parsing it.
        md5: expected md5 per upstream file name (e.g. ``{"cifar-10-python.tar.gz": "…"}``),
            overriding the published values; for mirrors of other releases and for tests.
        progress: show a tqdm bar while downloading (hidden anyway when not on a terminal).

    Raises:
        zsharp.data.ChecksumError: a file's md5 differs from the expected one.
        zsharp.data.CorruptArchiveError: a file cannot be parsed (truncated, corrupt, other
            layout).
        zsharp.data.DatasetError: a file cannot be found or downloaded.
        zsharp.data.errors.DatasetArgumentError: (a ValueError) a ``source`` or ``md5``
            that cannot apply to this dataset.
        KeyError: unknown dataset name.

    On any error nothing is published: no READY, no arrays under their final names, and
    downloaded files are removed.
    """
    spec = get_spec(name)
    directory = dataset_dir(root, name)
    if is_ready(directory):
        damage = check_prepared(directory)
        if damage is None:
            return directory
        print(f"zsharp: {damage}; preparing {spec.name} again", file=sys.stderr, flush=True)
    prepare = spec.preparer()  # a bad "module:function" fails before any download
    remotes = spec.remote_files()
    if not remotes and source is not None:
        raise DatasetArgumentError(f"{spec.name} has no remote files to fetch and takes no source")
    expected = _expected_md5(spec.name, remotes, md5)
    # Per process, so two jobs preparing the same dataset cannot write the same .part file.
    workdir = directory / f".downloads-{os.getpid()}"
    try:
        with staging(directory) as stage:
            files: dict[str, Path] = {}
            sums: dict[str, str] = {}
            for remote in remotes:
                location = resolve_source(remote, source, several=len(remotes) > 1)
                path, digest = fetch(location, workdir, progress=progress)
                if verify:
                    verify_md5(path, digest, expected[remote.filename])
                files[remote.filename], sums[remote.filename] = path, digest
            meta = {"name": spec.name, **prepare(files, stage)}
            if remotes:
                meta["source"] = {"files": sums, "verified": verify, "origin": _origin(source)}
            stage.commit(meta)
    finally:
        # The archives are not kept: the prepared arrays hold everything needed.
        shutil.rmtree(workdir, ignore_errors=True)
    return directory


def _expected_md5(
    name: str, remotes: tuple[RemoteFile, ...], overrides: Mapping[str, str] | None
) -> dict[str, str]:
    expected = {remote.filename: remote.md5 for remote in remotes}
    unknown = sorted(set(overrides or {}) - set(expected))
    if unknown:
        raise DatasetArgumentError(
            f"md5 given for {unknown[0]!r}, which is not a {name} file "
            f"(its files: {', '.join(expected) or 'none'})"
        )
    return {**expected, **(overrides or {})}


def _origin(source: str | os.PathLike[str] | None) -> str:
    return "upstream" if source is None else os.fspath(source)
