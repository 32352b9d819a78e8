"""Resumable checkpoints, written atomically (:mod:`zsharp.atomic`).

Checkpoints hold only tensors and plain containers
so they load with ``torch.load(weights_only=True)``; the random number generators' states
(torch CPU and CUDA, NumPy, Python) are stored in that form too.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from zsharp.atomic import atomic_open


def save(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """``torch.save`` atomically."""
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: no code runs from the file."""
    return torch.load(path, map_location=map_location, weights_only=True)


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
