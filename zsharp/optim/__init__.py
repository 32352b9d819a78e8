"""Sharpness-aware optimizers for any PyTorch training loop.

``SAM`` (and ASAM with ``adaptive=True``), ``FriendlySAM`` and ``ZSharp`` share one
two-pass API (``first_step`` / ``second_step`` / ``step(closure)``); the Z-score filter
(``ZScoreFilter``) composes with each of them. ``create(name, params, **kwargs)`` builds
any of them, or a plain SGD/Adam/AdamW, by name.
"""

from zsharp.optim.bn import disable_running_stats
from zsharp.optim.factory import OPTIMIZERS, SAM_FAMILY, create
from zsharp.optim.friendly import FriendlySAM
from zsharp.optim.sam import SAM
from zsharp.optim.zscore import VARIANTS, ZScoreFilter, zscore_mask
from zsharp.optim.zsharp import ZSharp

__all__ = [
    "OPTIMIZERS",
    "SAM",
    "SAM_FAMILY",
    "VARIANTS",
    "FriendlySAM",
    "ZScoreFilter",
    "ZSharp",
    "create",
    "disable_running_stats",
    "zscore_mask",
]
