"""LookSAM (Liu et al., CVPR 2022, arXiv 2203.02714): SAM's gradient every k steps, its
direction reused in between.

On every k-th step (steps 0, k, 2k, … of the loop: :meth:`LookSAM.takes_two_passes`) a
whole SAM step, which also keeps the component of the SAM gradient g_s = ∇L(w + ε)
orthogonal to the gradient at w (Algorithm 1, whole vectors):

    g_v = g_s − ⟨g, g_s⟩ / (‖g‖² + 1e-12) · g

and on the k − 1 steps in between one pass at w only, whose gradient g gets that direction
back, rescaled to its own norm:

    d = g + α · ‖g‖ / (‖g_v‖ + 1e-12) · g_v

so a step costs about 1 + 1/k passes. As the paper writes it and as Mi-Peng/sam-hub
(``solver/looksam.py``) and MarlonBecker/MSAM compute it, g_v and the norms are over the
whole model (pytorch_optimizer's LookSAM projects tensor by tensor instead, and on its
off steps adds the second backward onto the first: it is not this rule). The 1e-12 guards
are MSAM's; sam-hub has none (a zero gradient there is a NaN). g_v is this optimizer's
state (``state[p]["orthogonal"]``), saved by ``state_dict``; until the first refresh the
off steps are plain base steps.
"""

from __future__ import annotations

from typing import Any

import torch
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

#: the guards of the projection and of the rescaling
PROJECTION_EPS = 1e-12


class LookSAM(SAM):
    """LookSAM; with ``zfilter`` the refresh steps' ascent is Z-score filtered (ZSharp on
    LookSAM).

    Args:
        k: a sharpness-aware step every k-th step of the loop (k ≥ 1; 1 is SAM).
        alpha: α ≥ 0, the weight of the reused direction on the other steps.

    Every other argument is :class:`~zsharp.optim.SAM`'s (``rho`` defaults to 0.1, the
    value of sam-hub's CIFAR configuration, with k = 5 and α = 0.7).
    """

    keeps_ascent_gradient = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.1,
        k: int = 5,
        alpha: float = 0.7,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        zfilter: ZScoreFilter | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.k = k
        self._alpha = check_nonnegative("alpha", alpha)
        super().__init__(params, base_optimizer, rho, adaptive, eta, zfilter=zfilter, **base_kwargs)

    def _extra_defaults(self) -> dict[str, Any]:
        return {"alpha": self._alpha}

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_nonnegative("alpha", group["alpha"])

    def takes_two_passes(self, step: int) -> bool:
        """Steps 0, k, 2k, … refresh g_v with a whole SAM step."""
        return step % self.k == 0

    @torch.no_grad()
    def _descent(self, groups: list[DescentGroup], sharpness_aware: bool) -> None:
        params = [p for group in groups for p in group.params]
        grads = [d for group in groups for d in group.grads]
        device = grads[0].device
        if sharpness_aware:  # keep g_v; descend along g_s itself
            ascent = [g for group in groups for g in group.ascent_grads or []]
            inner = global_inner(ascent, grads, device)
            norm = global_norm(ascent, device)
            along = inner / (norm * norm + PROJECTION_EPS)
            finite = self._finite
            for p, g, g_s in zip(params, ascent, grads, strict=True):
                orthogonal = g_s - along.to(g_s.dtype) * g
                state = self.state[p]
                if finite is not None and "orthogonal" in state:  # an overflow keeps the old
                    orthogonal = torch.where(finite.to(g.device), orthogonal, state["orthogonal"])
                elif finite is not None:
                    orthogonal = torch.where(finite.to(g.device), orthogonal, 0.0)
                state["orthogonal"] = orthogonal
            return
        stored = [self.state[p].get("orthogonal") for p in params]
        if any(v is None for v in stored):  # no refresh yet: a plain base step
            return
        scale = global_norm(grads, device) / (global_norm(stored, device) + PROJECTION_EPS)
        for group in groups:
            alpha = float(group.group["alpha"])
            for p, d in zip(group.params, group.grads, strict=True):
                d.add_(self.state[p]["orthogonal"] * (alpha * scale).to(d.dtype))

    def state_dict(self) -> dict[str, Any]:
        """The base state, the groups, g_v, and k."""
        state = super().state_dict()
        state["k"] = self.k
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.k = int(state_dict.pop("k", self.k))
        super().load_state_dict(state_dict)
