"""ZSharp: SAM whose ascent direction is Z-score filtered layer by layer (arXiv 2505.02369).

The filter (``zsharp.optim.zscore``) keeps, in every parameter tensor, the gradient entries
whose |z| is in the top (100 − p) % and ZSharp perturbs along that filtered gradient:
ε = ρ·g̃/‖g̃‖ (paper, Eq. 7). The descent step uses the full gradient at w + ε. The filter
composes with every SAM variant here: ``ZSharp(adaptive=True)`` is ZSharp-on-ASAM and
``FriendlySAM(zfilter=ZScoreFilter(...))`` is ZSharp-on-Friendly-SAM.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from zsharp.optim.sam import SAM, ParamsT
from zsharp.optim.zscore import Variant, ZScoreFilter


class ZSharp(SAM):
    """SAM with layer-wise Z-score gradient filtering.

    Args:
        percentile: p in [0, 100); each tensor keeps the entries of its top (100 − p) %
            |z| (95: the top 5 %). A param group may set its own ``percentile``.
        variant: ``"paper"`` (the equations, default) or ``"official"`` (the released
            code); see :mod:`zsharp.optim.zscore` and :class:`~zsharp.optim.SAM`.

    Every other argument is :class:`~zsharp.optim.SAM`'s.
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        percentile: float = 95.0,
        variant: Variant = "paper",
        adaptive: bool = False,
        eta: float = 0.0,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            rho,
            adaptive,
            eta,
            zfilter=ZScoreFilter(percentile, variant),
            **base_kwargs,
        )

    @property
    def percentile(self) -> float:
        """The default p (groups may override it)."""
        return float(self.defaults["percentile"])

    @property
    def variant(self) -> str:
        """``"paper"`` or ``"official"``."""
        assert self.zfilter is not None
        return self.zfilter.variant
