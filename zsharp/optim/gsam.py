"""GSAM: Surrogate Gap Guided SAM (Zhuang et al., ICLR 2022, arXiv 2203.08065).

GSAM perturbs as SAM does, with a radius tied to the learning rate, and changes only the
descent: it keeps the whole gradient at w + ε and removes α times the part of the
gradient at w that is orthogonal to it, which lowers the surrogate gap
h(w) = L(w + ε) − L(w) without raising the perturbed loss (Algorithm 1):

    ρ_t = ρ_min + (ρ_max − ρ_min) · (η_t − η_min) / (η_max − η_min)   (ρ_max if η_max = η_min)
    ε   = ρ_t · g / (‖g‖ + 1e-12),   g = ∇L(w),   g' = ∇L(w + ε)
    g_⊥ = g − cos θ · ‖g‖ · g' / (‖g'‖ + 1e-12),   cos θ = ⟨g, g'⟩ / (‖g'‖ ‖g‖ + 1e-12)
    d   = g' − α · g_⊥                                                  (the descent gradient)

with one norm and one inner product over the whole model, as the authors' PyTorch code
(juntang-zhuang/GSAM, ``gsam.py``) computes them; its ε-guards make g_⊥ the paper's
g − ⟨g, g'⟩/‖g'‖² · g' up to 1e-12. The schedule of ρ follows the current learning rate η_t
of each param group, unclamped as in the reference (ρ_t < ρ_min below η_min, as in a
warm-up). ``adaptive=True`` scales as this library's ASAM does, ρ·T²g/‖Tg‖, which is the
authors' PyTorch port's adaptive form; the paper and the official JAX code scale by |w|
instead (|w| ⊙ ρg/‖g‖), which is not offered here. GSAM is SAM at α = 0 and ρ_min = ρ_max.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from zsharp.optim.sam import (
    SAM,
    DescentGroup,
    ParamsT,
    check_nonnegative,
    global_inner,
    global_norm,
)
from zsharp.optim.zscore import ZScoreFilter

#: the guard of the decomposition (the authors' ``perturb_eps``)
DECOMPOSITION_EPS = 1e-12


class GSAM(SAM):
    """Surrogate Gap Guided SAM; with ``zfilter`` its ascent is Z-score filtered (ZSharp on
    GSAM: ε from the filtered g, the descent from the whole g and g').

    Args:
        rho: ρ_max, the radius at the largest learning rate ``lr_max``.
        rho_min: ρ_min, the radius at ``lr_min`` (None: ``rho``, a constant radius).
        alpha: α ≥ 0, the share of g_⊥ removed from the descent gradient.
        lr_max: η_max (None: each param group's learning rate when the optimizer is built,
            which is the base rate a scheduler attached afterwards scales).
        lr_min: η_min, the learning rate at which the radius is ρ_min (0: the end of a
            cosine or linear decay).

    Every other argument is :class:`~zsharp.optim.SAM`'s. A group may set its own
    ``rho_min``, ``alpha``, ``lr_max``, ``lr_min``.
    """

    keeps_ascent_gradient = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        rho_min: float | None = None,
        alpha: float = 0.4,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        zfilter: ZScoreFilter | None = None,
        **base_kwargs: Any,
    ) -> None:
        self._own = {"rho_min": rho_min, "alpha": alpha, "lr_max": lr_max, "lr_min": lr_min}
        super().__init__(params, base_optimizer, rho, adaptive, eta, zfilter=zfilter, **base_kwargs)

    def _extra_defaults(self) -> dict[str, Any]:
        return dict(self._own)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_nonnegative("alpha", group["alpha"])
        check_nonnegative("lr_min", group["lr_min"])
        if group["rho_min"] is None:
            group["rho_min"] = group["rho"]
        check_nonnegative("rho_min", group["rho_min"])
        if group["lr_max"] is None:  # the base learning rate, before any scheduler scales it
            group["lr_max"] = float(group.get("initial_lr", group["lr"]))
        check_nonnegative("lr_max", group["lr_max"])

    def _radius(self, group: dict[str, Any]) -> float | Tensor:
        """ρ_t = ρ_min + (ρ_max − ρ_min)(η_t − η_min)/(η_max − η_min) (Algorithm 1, line 0)."""
        rho_max, rho_min = float(group["rho"]), float(group["rho_min"])
        lr_max, lr_min = float(group["lr_max"]), float(group["lr_min"])
        if lr_max == lr_min or rho_max == rho_min:
            return rho_max
        lr = group["lr"]  # a float, or a 0-d device tensor (CUDA graphs): no host sync
        return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)

    @torch.no_grad()
    def _descent(self, groups: list[DescentGroup], sharpness_aware: bool) -> None:
        """d = g' − α·g_⊥ in place of g' (the one-pass steps of ``interval`` keep ∇L(w))."""
        if not sharpness_aware:
            return
        perturbed = [d for group in groups for d in group.grads]  # g'
        ascent = [g for group in groups for g in group.ascent_grads or []]  # g
        device = perturbed[0].device
        inner = global_inner(ascent, perturbed, device)
        norm_p = global_norm(perturbed, device)
        norm_g = global_norm(ascent, device)
        cos = inner / (norm_p * norm_g + DECOMPOSITION_EPS)
        along = cos * norm_g / (norm_p + DECOMPOSITION_EPS)  # g_⊥ = g − along·g'
        for group in groups:
            alpha = float(group.group["alpha"])
            for d, g in zip(group.grads, group.ascent_grads or [], strict=True):
                # d ← g' − α(g − along·g') = (1 + α·along)·g' − α·g
                d.mul_((1.0 + alpha * along).to(d.dtype)).sub_(g, alpha=alpha)
