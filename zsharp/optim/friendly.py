"""Friendly-SAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization").

F-SAM removes the full-batch component of the gradient from the ascent direction, estimated
by an exponential moving average of past gradients (Eq. 8–9 of the paper, as in its
released code):

    d_t = g_t − σ · m_{t−1}             (d_1 = g_1)
    m_t = λ · m_{t−1} + (1 − λ) · g_t   (m_1 = g_1)

and perturbs along d exactly as SAM does along g. The moving average m is this optimizer's
state (``state[p]["momentum"]``) and is saved by ``state_dict()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from zsharp.optim.sam import SAM, AscentGroup, ParamsT, check_nonnegative
from zsharp.optim.zscore import ZScoreFilter


class FriendlySAM(SAM):
    """Friendly-SAM; with ``zfilter`` its direction d is Z-score filtered (ZSharp-on-F-SAM).

    Args:
        sigma: σ ≥ 0, how much of the moving average is removed from g (1 in the paper).
        lmbda: λ in [0, 1), the moving average's decay (0.9 in the paper).

    Every other argument is :class:`~zsharp.optim.SAM`'s.
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        zfilter: ZScoreFilter | None = None,
        **base_kwargs: Any,
    ) -> None:
        self._sigma, self._lmbda = sigma, lmbda
        super().__init__(params, base_optimizer, rho, adaptive, eta, zfilter=zfilter, **base_kwargs)

    def _extra_defaults(self) -> dict[str, Any]:
        return {"sigma": self._sigma, "lmbda": self._lmbda}

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_nonnegative("sigma", group["sigma"])
        lmbda = group["lmbda"]
        if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not 0 <= lmbda < 1:
            raise ValueError(f"lmbda must be in [0, 1), got {lmbda!r}")

    def _direction(self, group: AscentGroup) -> list[Tensor]:
        """d = g − σ·m_{t−1} (Eq. 9), updating m (Eq. 8); d_1 = m_1 = g_1.

        With a GradScaler, a pass whose gradients overflowed must not reach the moving
        average (it would stay inf/NaN for good): there m keeps its value (or starts at 0).
        """
        finite = self._finite
        sigma, lmbda = float(group.group["sigma"]), float(group.group["lmbda"])
        direction: list[Tensor] = []
        tracked_g, tracked_m, tracked_i = [], [], []
        for i, (p, g) in enumerate(zip(group.params, group.grads, strict=True)):
            state = self.state[p]
            if "momentum" in state:  # dict membership, not a tensor value: no sync
                tracked_g.append(g)
                tracked_m.append(state["momentum"])
                tracked_i.append(i)
            elif finite is None:
                state["momentum"] = g.clone()  # m_1 = g_1, d_1 = g_1
            else:
                state["momentum"] = torch.where(finite.to(g.device), g, 0.0)
            direction.append(g)
        if tracked_g:
            d = torch._foreach_add(tracked_g, tracked_m, alpha=-sigma)
            if finite is None:
                torch._foreach_mul_(tracked_m, lmbda)
                torch._foreach_add_(tracked_m, tracked_g, alpha=1.0 - lmbda)
            else:
                updated = torch._foreach_mul(tracked_m, lmbda)
                torch._foreach_add_(updated, tracked_g, alpha=1.0 - lmbda)
                for m, new in zip(tracked_m, updated, strict=True):
                    m.copy_(torch.where(finite.to(m.device), new, m))
            for i, d_i in zip(tracked_i, d, strict=True):
                direction[i] = d_i
        return direction
