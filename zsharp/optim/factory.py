"""``create(name, params, **kwargs)``: any optimizer of the registry, by name."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from zsharp.optim.args import ArgError, check_args
from zsharp.optim.registry import OPTIMIZERS, base_names, get_optimizer
from zsharp.optim.sam import ParamsT, check_base_kwargs


def base_optimizer_class(base: str | type[Optimizer]) -> type[Optimizer]:
    """The optimizer class of a base optimizer's name (a class passes through)."""
    if isinstance(base, str):
        if base not in base_names():
            raise ValueError(f"base must be one of {base_names()}, got {base!r}")
        return get_optimizer(base).load()
    return base


def create(name: str, params: ParamsT, **kwargs: Any) -> Optimizer:
    """Build optimizer ``name`` (a key of ``zsharp.optim.OPTIMIZERS``) for ``params``.

    A sharpness-aware optimizer takes ``base`` (a base optimizer's name, ``"sgd"`` by
    default, or an optimizer class) and passes the base optimizer's arguments (``lr``,
    ``momentum``, ``weight_decay``, …) through. Its own arguments default to the registry's
    values (e.g. ASAM's ρ = 0.5, η = 0.01); each is checked against its range there.

    >>> create("zsharp", model.parameters(), base="sgd", lr=0.1, momentum=0.9, rho=0.05)
    """
    try:
        info = get_optimizer(name)
    except ValueError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}") from None
    if info.is_base:
        cls = info.load()
        check_base_kwargs(cls, kwargs)
        return cls(params, **kwargs)
    base = base_optimizer_class(kwargs.pop("base", "sgd"))
    own = {k: v for k, v in kwargs.items() if k in info.arg_names}
    others = {k: v for k, v in kwargs.items() if k not in info.arg_names}
    sharpness_args = {a.name for i in OPTIMIZERS.values() if not i.is_base for a in i.args}
    for key in others:  # a SAM-family argument this one does not take: name the optimizer
        if key in sharpness_args or key in info.fixed:
            raise ValueError(
                f"argument {key!r} does not apply to {name} (it takes {sorted(info.arg_names)})"
            )
    try:
        own = check_args(info.args, own, name)
    except ArgError as error:
        raise ValueError(str(error)) from None
    return info.load()(params, base, **{**info.defaults, **own, **info.fixed, **others})


def params_for(name: str, model: Any) -> ParamsT:
    """What ``create(name, …)`` takes for ``model``: its parameters, or the param groups the
    optimizer needs (SAM-ON: :func:`~zsharp.optim.samon.normalization_groups`)."""
    if get_optimizer(name).groups == "normalization":
        from zsharp.optim.samon import normalization_groups

        return normalization_groups(model)
    return model.parameters()
