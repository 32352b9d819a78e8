"""Published results beside ours: a config's ``published:`` list, checked against the grid.

Each entry names a cell of the grid (dataset, model, and an optimizer entry's label or the
method of exactly one entry) and gives its result as its source does: accuracy or error in
percent, and a spread (a std, or a 95 % confidence interval over some runs). An entry that
names something outside the grid is a :class:`~zsharp.pipeline.grid.schema.GridError`
naming its key, before any job starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zsharp.optim.args import as_number
from zsharp.pipeline.grid.schema import GridError


@dataclass(frozen=True)
class Reference:
    """A published result of one cell of the grid (``published:``), as its source gives it:
    accuracy in percent, and its spread as a std or a 95 % confidence interval's half-width
    over ``runs`` runs (both in percent, None if the source gives none)."""

    index: int  # its place in ``published``
    dataset: str
    model: str
    label: str  # the optimizers entry it names
    accuracy: float
    std: float | None
    ci95: float | None
    runs: int | None
    source: str
    note: str = ""


def _published_label(name: str, entries: dict[str, str], where: str) -> str:
    """The entry a published result names: a label, or the method of exactly one entry."""
    if name in entries:
        return name
    users = [label for label, method in entries.items() if method == name]
    if len(users) == 1:
        return users[0]
    if users:
        raise GridError(
            f"{where}: {name!r} is the method of several entries ({', '.join(users)}); "
            "name one entry's label"
        )
    raise GridError(
        f"{where}: {name!r} is neither an optimizers entry nor the method of one "
        f"({', '.join(entries)})"
    )


def check_published(config: dict[str, Any]) -> list[Reference]:
    """The ``published`` references, each pointing at a cell of the grid, with one value
    (accuracy or error) and at most one spread (std, or ci95 with runs)."""
    entries = {
        label: str((entry or {}).get("optimizer", label))
        for label, entry in config["optimizers"].items()
    }
    references = []
    for i, item in enumerate(config.get("published") or []):
        where = f"published.{i}"
        for key, section in (("dataset", "datasets"), ("model", "models")):
            if item[key] not in config[section]:
                raise GridError(
                    f"{where}.{key}: {item[key]!r} is not one of the grid's {section} "
                    f"{list(config[section])}"
                )
        label = _published_label(item["optimizer"], entries, f"{where}.optimizer")
        if ("accuracy" in item) == ("error" in item):
            raise GridError(
                f"{where}.accuracy: give the accuracy or the error (in percent), exactly one"
            )
        if "std" in item and "ci95" in item:
            raise GridError(f"{where}.ci95: give std or ci95, not both")
        if "ci95" in item and "runs" not in item:
            raise GridError(f"{where}.runs: required with ci95 (the runs the interval is over)")
        accuracy = (
            float(as_number(item["accuracy"]))
            if "accuracy" in item
            else 100.0 - float(as_number(item["error"]))
        )
        spread = {k: float(as_number(item[k])) if k in item else None for k in ("std", "ci95")}
        references.append(
            Reference(
                index=i,
                dataset=item["dataset"],
                model=item["model"],
                label=label,
                accuracy=accuracy,
                std=spread["std"],
                ci95=spread["ci95"],
                runs=item.get("runs"),
                source=item["source"],
                note=item.get("note", ""),
            )
        )
    return references
