"""The optimizers every test of steps runs through, taken from the registry.

A case is a key, the registry name ``create`` takes and its own arguments: one case per
registry name, and one per ZSharp variant for the filtered ones (``zsharp`` is the paper's
rule, ``zsharp-official`` the released code's). A new registry entry joins every test that
iterates over these without a line changed here.
"""

from __future__ import annotations

from typing import Any

from zsharp.optim.registry import OPTIMIZERS


def _cases(include_base: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    cases: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, info in OPTIMIZERS.items():
        if info.is_base and not include_base:
            continue
        if "variant" in info.arg_names:
            cases[name] = (name, {"variant": "paper"})
            cases[f"{name}-official"] = (name, {"variant": "official"})
        else:
            cases[name] = (name, {})
    return cases


#: key → (registry name, its own arguments), the sharpness-aware optimizers only
SHARPNESS_AWARE = _cases(include_base=False)
#: the same with the base optimizers (sgd, adam, adamw)
EVERY_OPTIMIZER = _cases(include_base=True)
