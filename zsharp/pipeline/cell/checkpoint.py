"""Resumable checkpoints, written atomically (:mod:`zsharp.atomic`).

Checkpoints hold only tensors and plain containers
so they load with ``torch.load(weights_only=True)``; the random number generators' states
(torch CPU and CUDA, NumPy, Python) are stored in that form too. A file that cannot be read
back (truncated by a full or flaky disk, overwritten, not a checkpoint at all) raises
:class:`CorruptCheckpointError` naming it, never a bare unpickling error; a write that fails
(a full disk) raises the :class:`OSError` naming the file, not PyTorch's
``[enforce fail at inline_container.cc]``.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsharp.atomic import atomic_open, named


class CorruptCheckpointError(ValueError):
    """A checkpoint or weights file that cannot be read back; the message names it."""


class _Recorder:
    """A file handle that remembers the OSError of a failed write: ``torch.save`` turns
    it into a RuntimeError that says only ``unexpected pos``."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def save(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """``torch.save`` atomically; a failed write raises its OSError, naming ``path``."""
    with atomic_open(path, "wb") as handle:
        recorder = _Recorder(handle)
        try:
            torch.save(payload, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise named(recorder.error, path) from None


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: no code runs from the file.

    Raises:
        FileNotFoundError: there is no such file.
        CorruptCheckpointError: the file exists but is not a checkpoint PyTorch can read.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:  # truncated zip, random bytes, a pickle of other types, …
        reason = " ".join(str(error).split())[:200]
        raise CorruptCheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {reason}"
        ) from None


def set_aside(path: str | os.PathLike[str]) -> Path:
    """Rename an unusable checkpoint to ``NAME.corrupt-TIME`` (kept for inspection, never
    loaded again); return the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    counter = 1
    while target.exists():
        counter += 1
        target = target.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{counter}")
    path.replace(target)
    return target


def rng_state() -> dict[str, Any]:
    """Every random number generator's state, as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
