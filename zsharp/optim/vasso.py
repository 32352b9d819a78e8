"""VaSSO: variance-suppressed sharpness-aware optimization (Li & Giannakis, NeurIPS 2023,
arXiv 2309.15639).

VaSSO perturbs along a moving average of the gradient instead of the gradient itself, so
that the adversary's direction is less noisy than one minibatch's (Algorithm 1, as the
released code, BingcongLi/VaSSO ``solver/vasso.py``, computes it):

    d_t = (1 − θ) · d_{t−1} + θ · g_t      (d_1 = g_1: the released code starts from g)
    ε_t = ρ · d_t / (‖d_t‖ + 1e-7)          (one norm over the whole model)

and descends with the gradient at w + ε_t. θ = 1 is SAM. The moving average is this
optimizer's state (``state[p]["average"]``) and is saved by ``state_dict()``; the released
code restores w by subtracting ε, this library copies it back exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from zsharp.optim.sam import SAM, AscentGroup, ParamsT
from zsharp.optim.zscore import ZScoreFilter


def check_unit(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1], or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


class VaSSO(SAM):
    """VaSSO; with ``zfilter`` its averaged direction d is Z-score filtered (ZSharp on VaSSO).

    Args:
        theta: θ in [0, 1], the weight of the newest gradient in the average (0.9 in the
            released code).

    Every other argument is :class:`~zsharp.optim.SAM`'s. A group may set its own
    ``theta``.
    """

    #: the released code's guard (its SAM has 1e-7 too)
    norm_eps = 1e-7

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        theta: float = 0.9,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        zfilter: ZScoreFilter | None = None,
        **base_kwargs: Any,
    ) -> None:
        self._theta = check_unit("theta", theta)
        super().__init__(params, base_optimizer, rho, adaptive, eta, zfilter=zfilter, **base_kwargs)

    def _extra_defaults(self) -> dict[str, Any]:
        return {"theta": self._theta}

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_unit("theta", group["theta"])

    @torch.no_grad()
    def _direction(self, group: AscentGroup) -> list[Tensor]:
        """d_t = (1 − θ)·d_{t−1} + θ·g_t, d_1 = g_1; an overflowing pass (GradScaler) leaves
        d as it was."""
        theta = float(group.group["theta"])
        finite = self._finite
        direction = []
        for p, g in zip(group.params, group.grads, strict=True):
            state = self.state[p]
            if "average" not in state:  # dict membership: no sync
                start = g.clone() if finite is None else torch.where(finite.to(g.device), g, 0.0)
                state["average"] = start
            else:
                average = state["average"]
                new = average * (1.0 - theta) + g * theta
                average.copy_(
                    new if finite is None else torch.where(finite.to(g.device), new, average)
                )
            direction.append(state["average"])
        return direction
