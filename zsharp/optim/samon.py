"""SAM-ON: perturb only the normalisation layers (Mueller et al., NeurIPS 2023, arXiv
2306.04226, "Normalization Layers Are All That Sharpness-Aware Minimization Needs").

SAM-ON moves only the affine parameters of the normalisation layers (BatchNorm, LayerNorm,
GroupNorm: weight and bias) and normalises ε over them alone:

    ε_ℓ = ρ · T_ℓ² ⊙ g_ℓ / (‖T ⊙ g‖_ON + 1e-16)   for ℓ in the normalisation layers,
    ε_ℓ = 0                                         for every other tensor,

with T = 1 (SAM-ON) or T = |w| + η (ASAM-ON, ``adaptive=True``); the base optimizer then
steps every parameter with the gradient at w + ε. This is the released code's rule
(mueller-mp/SAM-ON, ``sam_on.py``, ``only_norm``; its README's recipe is ASAM-ON with T on
weights and biases, ρ = 10). The released code picks the normalisation parameters by
name (``'norm'`` or ``'bn'`` in it); here they are picked by module type, which agrees
on every model of this project and on the released code's, and neither includes an SE
block's parameters nor misses a shortcut's BatchNorm named ``downsample.1``.

It is the opposite selection to the released ZSharp's, which filters only tensors with
ndim > 1: the official Z-score variant composed with SAM-ON filters nothing (every
normalisation tensor is 1-D), so only the paper variant (``zsharp-samon``) changes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from zsharp.optim.sam import SAM, ParamsT
from zsharp.optim.zscore import ZScoreFilter

# the modules whose affine parameters SAM-ON perturbs
NORMALIZATION = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


def normalization_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters of ``model``'s normalisation layers (weight and bias), in order."""
    seen: set[int] = set()
    found = []
    for module in model.modules():
        if isinstance(module, NORMALIZATION) or type(module).__name__.endswith("Norm"):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    found.append(p)
    return found


def normalization_groups(
    model: nn.Module | Iterable[tuple[str, Tensor]], **options: Any
) -> list[dict[str, Any]]:
    """``model``'s parameters as the two param groups SAM-ON takes: the normalisation
    layers' (perturbed) and every other (``perturb=False``: it descends, never moves).
    ``options`` go into both groups (``lr``, ``weight_decay``, …)."""
    if not isinstance(model, nn.Module):
        raise ValueError("normalization_groups needs the model (its modules tell the norms)")
    norms = {id(p) for p in normalization_parameters(model)}
    params = list(model.parameters())
    perturbed = [p for p in params if id(p) in norms]
    others = [p for p in params if id(p) not in norms]
    groups = [{"params": perturbed, "perturb": True, **options}]
    if others:
        groups.append({"params": others, "perturb": False, **options})
    return groups


class SAMON(SAM):
    """SAM-ON (``adaptive=True``: ASAM-ON); with ``zfilter`` its ascent is Z-score filtered.

    ``params`` are param groups in which the tensors that must not be perturbed have
    ``perturb=False``: :func:`normalization_groups` makes them from a model. Groups
    without the key are perturbed, so passing ``model.parameters()`` is refused (that
    would be SAM). Every other argument is :class:`~zsharp.optim.SAM`'s (``rho`` defaults
    to 0.5, the released ``train.py``'s).
    """

    #: the released code's guard
    norm_eps = 1e-16

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.5,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        zfilter: ZScoreFilter | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, adaptive, eta, zfilter=zfilter, **base_kwargs)
        if all(group.get("perturb", True) for group in self.param_groups):
            raise ValueError(
                "params: SAM-ON perturbs only the normalisation layers; pass "
                "zsharp.optim.samon.normalization_groups(model) (groups with perturb=False "
                "for every other tensor), not model.parameters()"
            )
