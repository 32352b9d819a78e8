"""A cell folder: its files, who owns it, and the reading and writing of its records.

Every file name of a cell and every read or write of its summary, metrics, failures and
evaluation goes through here. ``zsharp train --out DIR`` writes a cell into DIR, so DIR must
be a place meant for one: not ``/``, not the home folder, not a file, and either new, empty,
or a cell already (it holds a cell's files, or only files this project writes into cells:
W&B runs, a lock, temporary files, checkpoints set aside as ``checkpoint.pt.corrupt-…``).
While a process trains or evaluates a cell it holds the cell's
:class:`~zsharp.atomic.DirectoryLock`: a second process on the same cell exits at once
naming the holder, instead of two runs writing one set of files (last writer wins). A
retrain removes the previous result files once every check that could refuse it has
passed, so a ``summary.json`` always belongs to the ``metrics.jsonl`` beside it, and a
refused run deletes nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zsharp import atomic
from zsharp.atomic import BusyError, DirectoryLock, remove_stale_temps

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
WEIGHTS = "model.pt"
EVALUATION = "eval.json"
CHECKPOINT = "checkpoint.pt"
FAILURES = "failures.jsonl"
# what a (re)train replaces: removed before it trains, so no file outlives its run
RESULT_FILES = (SUMMARY, WEIGHTS, EVALUATION, METRICS)
# a folder holding any of these is a cell
CELL_FILES = (*RESULT_FILES, CHECKPOINT, FAILURES)
# what else this project writes into a cell: W&B's runs, the lock, a temporary file
# (.NAME.*.tmp), a file set aside as unusable (NAME.corrupt-TIME[-N])
_SET_ASIDE = "|".join(map(re.escape, CELL_FILES))
_OURS = re.compile(rf"^(wandb|\.zsharp\.lock|\..+\.tmp|({_SET_ASIDE})\.corrupt-.+)$")


class CellError(ValueError):
    """An output folder that cannot hold this cell, or a cell in use; the message names
    the folder (and the process holding it)."""


class RecordError(ValueError):
    """A cell's record (summary, evaluation) that is absent or unreadable; the message
    names the file and says what to do."""


# --- the folder ------------------------------------------------------------------------------


def is_ours(name: str) -> bool:
    """Whether ``name`` is a file this project writes into a cell folder."""
    return name in CELL_FILES or _OURS.match(name) is not None


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
        foreign = [name for name in entries if not is_ours(name)]
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
    """Remove the result files of an earlier run (call it holding the cell, once nothing
    can refuse the run any more)."""
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)


# --- records ---------------------------------------------------------------------------------


def read_json(path: Path) -> tuple[Any, str | None]:
    """(the document, None), (None, None) if there is no file, or (None, why not)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{path}: cannot be read: {error}"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        return None, f"{path}: not valid JSON ({error})"


def read_summary(cell: Path) -> dict[str, Any]:
    """The cell's ``summary.json``: a JSON object that records a configuration, or a
    :class:`RecordError` naming the file (absent: the cell has not finished)."""
    path = cell / SUMMARY
    summary, problem = read_json(path)
    if problem is None and summary is None:
        problem = f"{path}: not found (the cell has not finished; zsharp train ... --out {cell})"
    if problem is None and not isinstance(summary, dict):
        problem = f"{path}: not a JSON object"
    if problem is None and not isinstance(summary.get("config"), dict):
        problem = f"{path}: records no configuration"
    if problem is not None:
        raise RecordError(problem)
    return summary


def write_summary(cell: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (last of a run: its presence means the cell ended)."""
    atomic.write_json(cell / SUMMARY, summary)


def write_metrics(cell: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl``: one line per epoch so far."""
    atomic.write_jsonl(cell / METRICS, records)


def read_metrics(cell: Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl`` ([] if absent); ValueError or OSError if
    a line cannot be read."""
    path = cell / METRICS
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: a line is not a JSON object")
    return records


def append_failure(cell: Path, entry: dict[str, Any]) -> None:
    """Add one line to ``failures.jsonl`` (append-only: every attempt's failure)."""
    with (cell / FAILURES).open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def read_failures(cell: Path) -> list[dict[str, Any]]:
    """The failures a cell has recorded (unreadable lines are skipped)."""
    path = cell / FAILURES
    entries = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    return [e for e in entries if isinstance(e, dict)]


def write_evaluation(cell: Path, result: dict[str, Any]) -> None:
    """Write ``eval.json``."""
    atomic.write_json(cell / EVALUATION, result)


def read_evaluation(cell: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(``eval.json``'s object or None if absent, None) or (None, why it is unusable)."""
    evaluation, problem = read_json(cell / EVALUATION)
    if problem is None and evaluation is not None and not isinstance(evaluation, dict):
        problem = f"{cell / EVALUATION}: not a JSON object"
    return (None, problem) if problem else (evaluation, None)
