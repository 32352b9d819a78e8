"""WSAM: weighted sharpness as a regularisation term (Yue et al., KDD 2023, arXiv 2305.15817).

WSAM minimises L(w) + γ/(1 − γ)·(max_{‖δ‖≤ρ} L(w + δ) − L(w)), γ in [0, 1): γ = 0 is the
base optimizer, γ = 1/2 is SAM. With α = γ/(1 − γ), g = ∇L(w) and g̃ = ∇L(w + ε), ε as
SAM's, the gradient of that objective is α·g̃ + (1 − α)·g. As the official code
(intelligent-machine-learning/atorch, ``atorch/optimizers/wsam.py``, formerly in dlrover)
computes one step:

* ``decouple=True`` (default, the paper's recommended "weight decouple"): the base
  optimizer (momentum, Adam's preconditioning, weight decay) steps with g alone, then
  w ← w − η·α·(g̃ − g), a plain step along the sharpness term at the group's current
  learning rate η;
* ``decouple=False``: the base optimizer steps with α·g̃ + (1 − α)·g.

``max_norm`` clips g and g̃ each to that global 2-norm before they are combined
(``clip_grad_norm_``'s rule), as the official code does at its latest version (an
earlier one, which pytorch_optimizer's WSAM follows, clipped g̃ only). The reference
restores w by subtracting ε; this library copies it back exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from zsharp.optim.sam import SAM, DescentGroup, ParamsT, check_nonnegative, clip_grad_norm_
from zsharp.optim.zscore import ZScoreFilter


class WSAM(SAM):
    """Weighted SAM; with ``zfilter`` its ascent is Z-score filtered (ZSharp on WSAM).

    Args:
        gamma: γ in [0, 1), the weight of sharpness (0.9 in the official code; 0.88 in its
            first commit, changed the same day).
        decouple: step the base optimizer with g and the sharpness term apart (default),
            or with the weighted sum.
        max_norm: clip g and g̃ to this global 2-norm each (None: no clipping).

    Every other argument is :class:`~zsharp.optim.SAM`'s.
    """

    keeps_ascent_gradient = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        gamma: float = 0.9,
        decouple: bool = True,
        max_norm: float | None = None,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        zfilter: ZScoreFilter | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
        if max_norm is not None:
            check_nonnegative("max_norm", max_norm)
        self.gamma, self.decouple, self.max_norm = float(gamma), bool(decouple), max_norm
        super().__init__(params, base_optimizer, rho, adaptive, eta, zfilter=zfilter, **base_kwargs)

    @property
    def alpha(self) -> float:
        """α = γ / (1 − γ), the weight of the sharpness term."""
        return self.gamma / (1.0 - self.gamma)

    @torch.no_grad()
    def _descent(self, groups: list[DescentGroup], sharpness_aware: bool) -> None:
        """The base optimizer's gradient: g (decoupled) or α·g̃ + (1 − α)·g; the decoupled
        sharpness term g̃ − g is kept for :meth:`_after_descent`."""
        if not sharpness_aware:
            return
        perturbed = [d for group in groups for d in group.grads]  # g̃
        ascent = [g.clone() for group in groups for g in group.ascent_grads or []]  # g
        if self.max_norm is not None:
            clip_grad_norm_(ascent, self.max_norm)
            clip_grad_norm_(perturbed, self.max_norm)
        alpha = self.alpha
        params = [p for group in groups for p in group.params]
        for p, g_tilde, g in zip(params, perturbed, ascent, strict=True):
            if self.decouple:
                self.state[p]["sharpness"] = g_tilde - g
                g_tilde.copy_(g)
            else:
                g_tilde.mul_(alpha).add_(g, alpha=1.0 - alpha)

    @torch.no_grad()
    def _after_descent(self, groups: list[DescentGroup], sharpness_aware: bool) -> None:
        """Decoupled: w ← w − η·α·(g̃ − g), skipped (like the base step) on an overflow."""
        if not (sharpness_aware and self.decouple):
            return
        alpha = self.alpha
        sharpness = [self.state[p].pop("sharpness") for group in groups for p in group.params]
        ok = None
        if self._finite is not None:  # a GradScaler skipped the base step on an overflow
            finite = torch.stack([torch.isfinite(s).all() for s in sharpness]).all()
            ok = finite & self._finite.to(finite.device)
        terms = iter(sharpness)
        for group in groups:
            factor = group.group["lr"] * alpha  # a float, or a 0-d tensor (CUDA graphs)
            for p in group.params:
                step = next(terms) * factor
                p.sub_(step if ok is None else torch.where(ok.to(p.device), step, 0.0))
