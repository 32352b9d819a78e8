"""A cell directory is one consistent unit, owned by one process at a time.

``zsharp train --out DIR`` writes a cell into DIR, so DIR must be a place meant for one:
not ``/``, not the home folder, not a file, and either new, empty, or a cell already (it
holds a cell's files). While a process trains or evaluates a cell it holds the cell's
:class:`~zsharp.atomic.DirectoryLock`: a second process on the same cell exits at once
naming the holder, instead of two runs writing one set of files (last writer wins). A
retrain first removes the previous result files, so a ``summary.json`` always belongs to
the ``metrics.jsonl`` beside it; temporary files of a writer that was killed go too.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from zsharp.atomic import BusyError, DirectoryLock, remove_stale_temps

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
WEIGHTS = "model.pt"
EVALUATION = "eval.json"
CHECKPOINT = "checkpoint.pt"
FAILURES = "failures.jsonl"
# what a (re)train replaces: removed before it starts, so no file outlives its run
RESULT_FILES = (SUMMARY, WEIGHTS, EVALUATION, METRICS)
# a folder holding any of these is a cell
CELL_FILES = (*RESULT_FILES, CHECKPOINT, FAILURES)
# entries that do not make a folder "not empty": W&B's runs, a lock, temporary files
_IGNORED = ("wandb", ".zsharp.lock")


class CellError(ValueError):
    """An output folder that cannot hold this cell, or a cell in use; the message names
    the folder (and the process holding it)."""


def check_out_dir(out: Path, flag: str = "--out") -> Path:
    """Raise :class:`CellError` unless ``out`` may receive a cell; return it resolved."""
    resolved = out.expanduser().absolute()
    with contextlib.suppress(OSError, RuntimeError):  # a symlink loop: judged as written
        resolved = resolved.resolve()
    home = None
    with contextlib.suppress(RuntimeError, KeyError, OSError):
        home = Path.home().resolve()
    if resolved == Path(resolved.anchor):
        raise CellError(f"{flag} {out}: refusing to write a cell into the root folder")
    if home is not None and resolved == home:
        raise CellError(f"{flag} {out}: refusing to write a cell into the home folder {home}")
    if out.exists() and not out.is_dir():
        raise CellError(f"{flag} {out}: exists and is not a folder")
    if out.is_dir():
        try:
            entries = sorted(p.name for p in out.iterdir())
        except OSError as error:
            raise CellError(f"{flag} {out}: cannot list it: {error.strerror}") from None
        foreign = [
            name
            for name in entries
            if name not in _IGNORED and not (name.startswith(".") and name.endswith(".tmp"))
        ]
        if foreign and not any(name in CELL_FILES for name in entries):
            shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
            raise CellError(
                f"{flag} {out}: a folder that is neither empty nor a cell (it holds {shown}); "
                "name a new or empty folder for the cell"
            )
    return resolved


@contextlib.contextmanager
def claim(out: Path, purpose: str = "zsharp train", check: bool = True) -> Iterator[Path]:
    """Own the cell ``out`` for the block: check it (see :func:`check_out_dir`), create it,
    lock it, and remove temporary files a killed writer left there. Raises
    :class:`CellError` if the folder is refused, cannot be written, or is in use."""
    if check:
        check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(out, purpose).__enter__()
    except BusyError as error:
        raise CellError(str(error)) from None
    except OSError as error:
        where = error.filename or out
        raise CellError(
            f"{where}: cannot write the cell here: [Errno {error.errno}] {error.strerror}"
        ) from None
    try:
        for stale in remove_stale_temps(out):
            print(f"{out}: removed {stale.name}, left by a killed writer", file=sys.stderr)
        yield out
    finally:
        lock.__exit__(None, None, None)


def clear_results(out: Path) -> None:
    """Remove the result files of an earlier run (call it holding the cell)."""
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
