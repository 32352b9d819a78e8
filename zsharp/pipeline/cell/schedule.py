"""Learning-rate schedules as multipliers of the base rate, evaluated every step.

``cosine``   linear warm-up over ``warmup_epochs``, then cosine annealing to 0 at the end;
``paper``    the ZSharp paper's: linear warm-up over ``warmup_epochs`` (5 in the paper),
             then ×``decay_gamma`` (0.75) every ``decay_every`` epochs (10 in the paper's
             text, 30 in its code), counted from the end of the warm-up;
``constant`` linear warm-up, then the base rate.

Two warm-up shapes (``warmup_per_epoch``):

* per step (default): the multiplier of step s < W·n (n steps per epoch) is (s + 1)/(W·n),
  reaching 1 at the warm-up's last step; the schedule's epoch count starts after it.
* per epoch (the released code: ``GradualWarmupScheduler(multiplier=1, total_epoch=W)``
  wrapping ``StepLR``, stepped once per epoch): epoch e ≤ W trains at e/W (epoch 0 at LR
  0), and after the warm-up the wrapped schedule counts t = e − W − 1 epochs, so the first
  decay of ``paper`` comes at epoch W + 1 + ``decay_every`` (36 for W = 5, every 30).

The multiplier is a pure function of the step, so a resumed run continues the schedule
exactly (``LambdaLR`` saves only its step count).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from zsharp.pipeline.cell.config import CellConfig


def _after_warmup(cfg: CellConfig, t: float, remaining: float) -> float:
    """The schedule's multiplier ``t`` epochs after the warm-up, of ``remaining`` epochs."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "paper":
        return cfg.decay_gamma ** (int(t) // cfg.decay_every)
    return 0.5 * (1.0 + math.cos(math.pi * min(t / max(remaining, 1.0), 1.0)))


def epoch_multiplier(cfg: CellConfig, epoch: int) -> float:
    """The per-epoch schedule's multiplier of epoch ``epoch`` (0-based)."""
    warmup = cfg.warmup_epochs
    if warmup and epoch <= warmup:
        return epoch / warmup
    t = epoch - warmup - 1 if warmup else epoch
    return _after_warmup(cfg, t, cfg.epochs - warmup - (1 if warmup else 0))


def lr_lambda(cfg: CellConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of ``cfg``'s schedule at optimizer step ``step`` (0-based)."""
    if cfg.warmup_per_epoch:
        return lambda step: epoch_multiplier(cfg, step // steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "paper":
            return _after_warmup(cfg, (step - warmup) // steps_per_epoch, 0)
        return _after_warmup(cfg, (step - warmup) / steps_per_epoch,
                             (total - warmup) / steps_per_epoch)  # fmt: skip

    return factor
