"""Matched-perturbation controls: an entry whose ρ makes its ‖ε‖ equal another entry's.

``optimizers: {sam-matched: {optimizer: sam, match: zsharp}}`` makes, for every dataset and
model of the grid, a SAM whose ρ is chosen so that its perturbation norm equals the
``zsharp`` entry's for that model (:func:`zsharp.optim.perturbation.matched_rho`): the
released ZSharp normalises each filtered tensor on its own (‖ε‖ ≈ ρ·√n, n its tensors
with ndim > 1), so a "ZSharp beats SAM" result may be a "larger ρ beats smaller ρ" one; the
matched SAM tells them apart. The value is computed from the rule and the model's tensor
shapes (the model built on PyTorch's meta device: no memory, no data), so it is known
before anything trains, the same for every seed, and part of the cell's configuration
(its ``opt_args.rho``); the cell's summary records how it was chosen (``matched``).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from zsharp.data.registry import get_spec
from zsharp.optim.perturbation import UndeterminedNormError, matched_rho
from zsharp.pipeline.grid.schema import GridError


@functools.cache
def parameter_shapes(
    model: str, num_classes: int, image_size: int, channels: int, frozen_options: str
) -> tuple[tuple[int, ...], ...]:
    """The shapes of ``model``'s parameter tensors, built on the meta device."""
    import torch

    from zsharp.models import build_model

    with torch.device("meta"):
        net = build_model(model, num_classes, image_size, channels, **json.loads(frozen_options))
    return tuple(tuple(p.shape) for p in net.parameters())


def check_matches(optimizers: dict[str, Any]) -> dict[str, str]:
    """{entry: the entry it matches} of the ``match`` keys, each naming another entry that
    matches none itself; a GridError naming the key otherwise."""
    matches = {}
    for label, entry in optimizers.items():
        target = (entry or {}).get("match")
        if target is None:
            continue
        where = f"optimizers.{label}.match"
        if target == label:
            raise GridError(f"{where}: an entry cannot match itself")
        if target not in optimizers:
            raise GridError(f"{where}: {target!r} is not an optimizers entry")
        if (optimizers[target] or {}).get("match"):
            raise GridError(f"{where}: {target!r} is matched to another entry itself")
        if "rho" in ((entry or {}).get("opt_args") or {}):
            raise GridError(f"optimizers.{label}.opt_args.rho: match sets ρ; remove rho or match")
        matches[label] = target
    return matches


def matched_settings(
    label: str,
    target: str,
    optimizer: str,
    settings: dict[str, Any],
    target_optimizer: str,
    target_args: dict[str, Any],
    dataset: str,
    model: str,
    model_args: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``settings`` with the matched ρ in ``opt_args``, and the record of the match."""
    spec = get_spec(dataset)
    shapes = parameter_shapes(
        model, spec.num_classes, spec.image_size, spec.channels,
        json.dumps(model_args, sort_keys=True),
    )  # fmt: skip
    own_args = {k: v for k, v in (settings.get("opt_args") or {}).items() if k != "rho"}
    try:
        rho, record = matched_rho(optimizer, own_args, target_optimizer, target_args, shapes)
    except UndeterminedNormError as error:
        raise GridError(
            f"optimizers.{label}.match: cannot match {target!r} ({error}); match an entry "
            f"whose ‖ε‖ its rule decides"
        ) from None
    settings = {**settings, "opt_args": {**own_args, "rho": rho}}
    return settings, {"entry": target, "model": model, **record}
