"""Finding, fetching and checking upstream files.

A *source* is where the user says the upstream files are, overriding the published URL:

* ``None``: the published URL of each file;
* a URL (``http://``, ``https://``, ``ftp://`` or ``file://``): the file itself, or, when it
  ends with ``/`` or the dataset has several files (SVHN), a base to which each upstream
  file name is appended;
* a local path: the file itself, or a directory that holds the file under its upstream name.

Local files are read in place (never copied); URLs are streamed into a work directory
(``<file>.part``, renamed when complete). Every file's md5 is computed on the way, so the
check costs no extra pass over a download.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from zsharp.data.errors import ChecksumError, DatasetError, one_line
from zsharp.data.registry import RemoteFile

__all__ = ["fetch", "is_url", "md5_file", "resolve_source", "verify_md5"]

_URL_SCHEMES = frozenset({"http", "https", "ftp", "file"})
_CHUNK = 1 << 20
# Seconds without a byte before a download is abandoned (not a limit on the whole transfer).
_SOCKET_TIMEOUT_S = 60


def is_url(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` is a URL we can fetch (as opposed to a local path)."""
    return urllib.parse.urlparse(str(source)).scheme.lower() in _URL_SCHEMES


def md5_file(path: str | os.PathLike[str]) -> str:
    """The hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_source(
    remote: RemoteFile, source: str | os.PathLike[str] | None, *, several: bool
) -> str | Path:
    """Where to get ``remote`` given the user's ``source`` (see the module docstring).

    Args:
        remote: the upstream file wanted.
        source: the user's override, or ``None`` for the published URL.
        several: whether the dataset has several upstream files, so that ``source`` must
            be a base (URL or directory) rather than one file.
    """
    if source is None:
        return remote.url
    text = os.fspath(source)
    if is_url(text):
        if text.endswith("/") or several:
            return text.rstrip("/") + "/" + urllib.parse.quote(remote.filename)
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        return path / remote.filename
    if several:
        raise DatasetError(
            f"source {text!r} must be a directory or base URL holding {remote.filename}"
        )
    return path


def fetch(location: str | Path, workdir: Path, *, progress: bool = True) -> tuple[Path, str]:
    """Make ``location`` available as a local file and return ``(path, md5)``.

    Local paths are returned as they are; URLs are downloaded into ``workdir``.

    Raises:
        DatasetError: the file is missing, the download fails or ends early.
    """
    if isinstance(location, Path) or not is_url(location):
        path = Path(location)
        if not path.is_file():
            raise DatasetError(f"{path}: no such file")
        return path, md5_file(path)
    return _download(location, workdir, progress=progress)


def verify_md5(path: Path, actual: str, expected: str | None) -> None:
    """Raise :class:`ChecksumError` unless ``actual`` equals ``expected`` (``None``: no check)."""
    if expected is not None and actual.lower() != expected.lower():
        raise ChecksumError(
            f"{path}: md5 {actual} does not match the expected {expected.lower()}; the file is "
            "truncated, corrupt or a different release (delete it and download it again)"
        )


def _download(url: str, workdir: Path, *, progress: bool) -> tuple[Path, str]:
    """Stream ``url`` into ``workdir``; the final name appears only once every byte arrived."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"
    workdir.mkdir(parents=True, exist_ok=True)
    final = workdir / name
    part = workdir / (name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=_SOCKET_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            expected_bytes = int(length) if length is not None else None
            with open(part, "wb") as out:
                received, md5 = _copy_with_md5(
                    response, out, total=expected_bytes, desc=name, progress=progress
                )
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DatasetError(f"could not download {url}: {one_line(reason)}") from exc
    if expected_bytes is not None and received != expected_bytes:
        part.unlink(missing_ok=True)
        # http.client does not raise when a server closes early; the length header is the
        # only way to tell a short read from a complete one.
        raise DatasetError(
            f"could not download {url}: connection closed after {received} of "
            f"{expected_bytes} bytes"
        )
    part.replace(final)
    return final, md5


def _copy_with_md5(
    src: BinaryIO, dst: BinaryIO, *, total: int | None, desc: str, progress: bool
) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` in chunks, hashing on the way; return (bytes, md5)."""
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    # disable=None lets tqdm hide the bar when stderr is not a terminal (batch jobs, logs).
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=None if progress else True,
        leave=False,
    ) as bar:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            dst.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received, digest.hexdigest()
