"""Exceptions raised by :mod:`zsharp.data`; each message is one line that names the file."""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "CorruptArchiveError",
    "CorruptDatasetError",
    "DatasetArgumentError",
    "DatasetError",
    "DatasetNotReadyError",
    "one_line",
]


class DatasetError(RuntimeError):
    """Base class for dataset download/preparation/loading failures."""


class ChecksumError(DatasetError):
    """A downloaded or supplied archive does not have the expected md5."""


class CorruptArchiveError(DatasetError):
    """An archive could not be read: truncated, corrupt, or not in the upstream layout."""


class DatasetArgumentError(DatasetError, ValueError):
    """A ``source`` or ``md5`` argument that cannot apply to the dataset.

    A ``ValueError`` for library callers, and a ``DatasetError`` so that the command line
    reports it in one line like the other dataset errors.
    """


class DatasetNotReadyError(DatasetError):
    """``load_prepared`` was asked for data that has not been (completely) prepared."""


class CorruptDatasetError(DatasetNotReadyError):
    """A prepared dataset whose files do not match its ``meta.json`` (truncated, changed):
    it counts as not prepared, and preparing it again mends it."""


def one_line(obj: object) -> str:
    """``str(obj)`` with all whitespace runs squeezed to one space, so messages stay one line."""
    return " ".join(str(obj).split())
