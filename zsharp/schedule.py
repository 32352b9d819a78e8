"""Learning-rate schedules as multipliers of the base rate, evaluated every step.

``cosine``   linear warm-up over ``warmup_epochs``, then cosine annealing to 0 at the end;
``paper``    the ZSharp paper's: linear warm-up over ``warmup_epochs`` (5 in the paper),
             then ×``decay_gamma`` (0.75) every ``decay_every`` epochs (10 in the paper's
             text, 30 in its code), counted from the end of the warm-up;
``constant`` linear warm-up, then the base rate.

The multiplier is a pure function of the step, so a resumed run continues the schedule
exactly (``LambdaLR`` saves only its step count).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from zsharp.config import CellConfig


def lr_lambda(cfg: CellConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of ``cfg``'s schedule at optimizer step ``step`` (0-based)."""
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "paper":
            epochs_after_warmup = (step - warmup) // steps_per_epoch
            return cfg.decay_gamma ** (epochs_after_warmup // cfg.decay_every)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor
