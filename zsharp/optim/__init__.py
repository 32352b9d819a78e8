"""Sharpness-aware optimizers for any PyTorch training loop.

``SAM`` (and ASAM with ``adaptive=True``), ``FriendlySAM`` and ``ZSharp`` share one
two-pass API (``first_step`` / ``second_step`` / ``step(closure)``); the Z-score filter
(``ZScoreFilter``) composes with each of them. ``create(name, params, **kwargs)`` builds
any of them, or a plain SGD/Adam/AdamW, by name; ``OPTIMIZERS`` is the registry behind it.

This package imports nothing from the rest of ``zsharp``, and nothing heavy until used:
the registry (``zsharp.optim.registry``) and the argument rules (``zsharp.optim.args``)
are plain data, readable without importing PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

from zsharp.optim.registry import (
    OPTIMIZERS,
    OptimizerInfo,
    get_optimizer,
    register_optimizer,
)

_LAZY = {
    "SAM": "zsharp.optim.sam",
    "GSAM": "zsharp.optim.gsam",
    "LookSAM": "zsharp.optim.looksam",
    "WSAM": "zsharp.optim.wsam",
    "VaSSO": "zsharp.optim.vasso",
    "SAMON": "zsharp.optim.samon",
    "normalization_groups": "zsharp.optim.samon",
    "FriendlySAM": "zsharp.optim.friendly",
    "ZSharp": "zsharp.optim.zsharp",
    "ZScoreFilter": "zsharp.optim.zscore",
    "VARIANTS": "zsharp.optim.zscore",
    "zscore_mask": "zsharp.optim.zscore",
    "create": "zsharp.optim.factory",
    "params_for": "zsharp.optim.factory",
    "disable_running_stats": "zsharp.optim.bn",
    "SharpnessAwareStep": "zsharp.optim.step",
}

__all__ = [
    "GSAM",
    "OPTIMIZERS",
    "SAM",
    "SAMON",
    "VARIANTS",
    "WSAM",
    "FriendlySAM",
    "LookSAM",
    "OptimizerInfo",
    "SharpnessAwareStep",
    "VaSSO",
    "ZScoreFilter",
    "ZSharp",
    "create",
    "disable_running_stats",
    "get_optimizer",
    "normalization_groups",
    "params_for",
    "register_optimizer",
    "zscore_mask",
]


def __getattr__(name: str) -> Any:
    """Import the PyTorch parts on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zsharp.optim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
