"""ZSharp: SAM whose ascent direction is Z-score filtered layer by layer (arXiv 2505.02369).

The filter (:class:`~zsharp.optim.zscore.ZScoreFilter`) keeps, in every parameter tensor,
the gradient entries whose |z| is in the top (100 − p) % (Eq. 4–6) and ZSharp perturbs
along that filtered gradient: ε = ρ·g̃/‖g̃‖ (Eq. 7). The descent step uses the full
gradient at w + ε. The filter composes with every SAM variant here: ``ZSharp`` is
``SAM(zfilter=ZScoreFilter(p, variant))``, ``ZSharp(adaptive=True)`` is ZSharp-on-ASAM and
``ZSharpFriendly`` is ``FriendlySAM(zfilter=…)``, ZSharp-on-Friendly-SAM; ``ZSharpGSAM``,
``ZSharpLookSAM``, ``ZSharpWSAM``, ``ZSharpVaSSO`` and ``ZSharpSAMON`` the same on the rest
of the family (:func:`z_filtered`).
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from zsharp.optim.friendly import FriendlySAM
from zsharp.optim.gsam import GSAM
from zsharp.optim.looksam import LookSAM
from zsharp.optim.sam import SAM, ParamsT
from zsharp.optim.samon import SAMON
from zsharp.optim.vasso import VaSSO
from zsharp.optim.wsam import WSAM
from zsharp.optim.zscore import Variant, ZScoreFilter


class _Filtered:
    """The filter's settings, read back from a filtered optimizer."""

    defaults: dict[str, Any]
    zfilter: ZScoreFilter

    @property
    def percentile(self) -> float:
        """The default p (groups may override it)."""
        return float(self.defaults["percentile"])

    @property
    def variant(self) -> str:
        """``"paper"`` or ``"official"``."""
        return self.zfilter.variant


class ZSharp(_Filtered, SAM):
    """SAM with layer-wise Z-score gradient filtering.

    Args:
        percentile: p in [0, 100); each tensor keeps the entries of its top (100 − p) %
            |z| (95: the top 5 %). A param group may set its own ``percentile``.
        variant: ``"paper"`` (the equations, default) or ``"official"`` (the released
            code); see :mod:`zsharp.optim.zscore`.

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
        zfilter = ZScoreFilter(percentile, variant)
        super().__init__(params, base_optimizer, rho, adaptive, eta, zfilter=zfilter, **base_kwargs)


class ZSharpFriendly(_Filtered, FriendlySAM):
    """ZSharp on Friendly-SAM: F-SAM whose direction d = g − σ·m is Z-score filtered.

    Takes :class:`~zsharp.optim.FriendlySAM`'s arguments and ``percentile``, ``variant``
    as :class:`ZSharp`.
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        percentile: float = 95.0,
        variant: Variant = "paper",
        adaptive: bool = False,
        eta: float = 0.0,
        **base_kwargs: Any,
    ) -> None:
        zfilter = ZScoreFilter(percentile, variant)
        super().__init__(
            params, base_optimizer, rho, sigma, lmbda, adaptive, eta, zfilter=zfilter, **base_kwargs
        )


def z_filtered(cls: type[SAM]) -> type[SAM]:
    """``cls`` with the Z-score filter on its ascent: ``cls``'s arguments plus
    ``percentile`` and ``variant`` (ZSharp on that variant; its descent is ``cls``'s)."""

    class Filtered(_Filtered, cls):  # type: ignore[valid-type, misc]
        def __init__(
            self,
            params: ParamsT,
            base_optimizer: type[Optimizer],
            *args: Any,
            percentile: float = 95.0,
            variant: Variant = "paper",
            **kwargs: Any,
        ) -> None:
            zfilter = ZScoreFilter(percentile, variant)
            super().__init__(params, base_optimizer, *args, zfilter=zfilter, **kwargs)

    Filtered.__name__ = Filtered.__qualname__ = f"ZSharp{cls.__name__}"
    Filtered.__doc__ = f"ZSharp on {cls.__name__}: {cls.__name__} whose ascent is Z-score filtered."
    return Filtered


ZSharpGSAM = z_filtered(GSAM)
ZSharpLookSAM = z_filtered(LookSAM)
ZSharpWSAM = z_filtered(WSAM)
ZSharpVaSSO = z_filtered(VaSSO)
ZSharpSAMON = z_filtered(SAMON)
