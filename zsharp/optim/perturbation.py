"""How far an optimizer's ascent moves the weights, ‖ε‖, where its rule alone decides it.

For most of the SAM family ‖ε‖ = ρ whatever the gradient: ε is ρ times a unit vector
(SAM, Friendly-SAM, the paper's ZSharp, LookSAM, WSAM, VaSSO, SAM-ON, GSAM with a constant
radius). The released ZSharp normalises each filtered tensor (ndim > 1) on its own, so each
has ‖ε_ℓ‖ = ρ and ‖ε‖² = ρ²·(n + s), with n the number of such tensors and s ∈ [0, 1] the
1-D tensors' share ‖g_1D‖²/‖g‖² of SAM's step: ‖ε‖ = ρ·√n to within a factor √(1 + 1/n)
(the 1-D share is measured, not known in advance; on ResNet-20, n = 20, it was 0.07).
Where ‖ε‖ depends on the weights (ASAM's T = |w| + η, any ``adaptive``) or on the step
(GSAM's scheduled ρ_t, before the first refresh of LookSAM), no rule gives it:
:func:`perturbation_norm` raises.

This is what a *matched* control needs: SAM with ρ set so that its ‖ε‖ equals another
entry's, for the same model, separates "a larger perturbation" from "the filter".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from zsharp.optim.registry import get_optimizer

Shape = Sequence[int]


class UndeterminedNormError(ValueError):
    """The optimizer's ‖ε‖ depends on the weights or the step, not on its rule alone."""


def perturbation_norm(
    name: str, args: Mapping[str, Any], shapes: Sequence[Shape]
) -> tuple[float, str]:
    """(‖ε‖ per unit ρ, the rule in words) of optimizer ``name`` with arguments ``args``
    for a model whose parameter tensors have ``shapes``. Linear in ρ: multiply by ρ.

    Raises:
        UndeterminedNormError: ‖ε‖ is not a function of the rule and the shapes.
    """
    info = get_optimizer(name)
    if info.is_base:
        raise UndeterminedNormError(f"{name} takes no ascent step (‖ε‖ = 0)")
    values = {**info.defaults, **info.fixed, **args}
    if values.get("adaptive"):
        raise UndeterminedNormError(
            f"{name}'s ‖ε‖ depends on the weights (adaptive: T = |w| + η scales it)"
        )
    rho_min = values.get("rho_min")
    if "rho_min" in info.arg_names and rho_min is not None and rho_min != values["rho"]:
        raise UndeterminedNormError(f"{name}'s radius follows the learning rate (rho_min)")
    if values.get("variant") == "official":
        filtered = sum(1 for shape in shapes if len(shape) > 1)
        return math.sqrt(filtered), (
            f"ρ·√{filtered}: the released ZSharp normalises each of the model's {filtered} "
            "tensors with ndim > 1 on its own (the 1-D tensors' SAM share adds at most ρ² "
            "to ‖ε‖²)"
        )
    return 1.0, "ρ: ε is ρ times a unit vector"


def matched_rho(
    baseline: str,
    baseline_args: Mapping[str, Any],
    target: str,
    target_args: Mapping[str, Any],
    shapes: Sequence[Shape],
) -> tuple[float, dict[str, Any]]:
    """ρ of ``baseline`` at which its ‖ε‖ equals ``target``'s for a model of ``shapes``,
    and a record of how it was chosen (for the cell's summary)."""
    target_unit, target_rule = perturbation_norm(target, target_args, shapes)
    baseline_unit, baseline_rule = perturbation_norm(baseline, baseline_args, shapes)
    norm = float({**get_optimizer(target).defaults, **target_args}["rho"]) * target_unit
    rho = norm / baseline_unit
    return rho, {
        "norm": norm,
        "rho": rho,
        "target_rule": target_rule,
        "rule": baseline_rule,
    }
