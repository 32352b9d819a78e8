"""Optimizers by name, so configs and the command line can name them as strings."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from zsharp.catalog import SAM_ARGS
from zsharp.optim.friendly import FriendlySAM
from zsharp.optim.sam import SAM, ParamsT, check_base_kwargs
from zsharp.optim.zscore import ZScoreFilter, check_percentile, check_variant
from zsharp.optim.zsharp import ZSharp

BASE_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
SAM_FAMILY = ("sam", "asam", "fsam", "zsharp", "zsharp-asam", "zsharp-fsam")
OPTIMIZERS: tuple[str, ...] = (*BASE_OPTIMIZERS, *SAM_FAMILY)

_ALL_SAM_ARGS = frozenset().union(*SAM_ARGS.values())

# ASAM's own defaults (Kwon et al. 2021): its scale-invariant radius is larger than SAM's.
ASAM_DEFAULTS = {"rho": 0.5, "eta": 0.01}


def base_optimizer_class(base: str | type[Optimizer]) -> type[Optimizer]:
    """The optimizer class for a name in ``BASE_OPTIMIZERS`` (a class passes through)."""
    if isinstance(base, str):
        if base not in BASE_OPTIMIZERS:
            raise ValueError(f"base must be one of {list(BASE_OPTIMIZERS)}, got {base!r}")
        return BASE_OPTIMIZERS[base]
    return base


def create(name: str, params: ParamsT, **kwargs: Any) -> Optimizer:
    """Build optimizer ``name`` for ``params``.

    ``name`` is one of ``OPTIMIZERS``. The SAM family takes ``base`` (``"sgd"``,
    ``"adam"``, ``"adamw"`` or an optimizer class; default ``"sgd"``) and passes the base
    optimizer's arguments (``lr``, ``momentum``, ``weight_decay``, …) through; ``asam`` and
    ``zsharp-asam`` default to ASAM's ρ = 0.5, η = 0.01. ``zsharp*`` take ``percentile``
    and ``variant``; ``fsam`` and ``zsharp-fsam`` take ``sigma`` and ``lmbda``.

    >>> create("zsharp", model.parameters(), base="sgd", lr=0.1, momentum=0.9, rho=0.05)
    """
    if name in BASE_OPTIMIZERS:
        cls = BASE_OPTIMIZERS[name]
        check_base_kwargs(cls, kwargs)
        return cls(params, **kwargs)
    if name not in SAM_FAMILY:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
    base = base_optimizer_class(kwargs.pop("base", "sgd"))
    own = SAM_ARGS[name]
    for key in kwargs:  # name the optimizer, not the base, when a SAM argument is misplaced
        if key not in own and key in _ALL_SAM_ARGS:
            raise ValueError(f"argument {key!r} does not apply to {name} (it takes {sorted(own)})")
    if name.endswith("asam"):
        kwargs = {**ASAM_DEFAULTS, **kwargs, "adaptive": True}
    if name == "sam" or name == "asam":
        return SAM(params, base, **kwargs)
    if name == "fsam":
        return FriendlySAM(params, base, **kwargs)
    percentile = check_percentile(kwargs.pop("percentile", 95.0))
    variant = check_variant(kwargs.pop("variant", "paper"))
    if name == "zsharp-fsam":
        zfilter = ZScoreFilter(percentile, variant)  # type: ignore[arg-type]
        return FriendlySAM(params, base, zfilter=zfilter, **kwargs)
    return ZSharp(params, base, percentile=percentile, variant=variant, **kwargs)  # type: ignore[arg-type]
