"""The experiment grid of the Snakemake workflow: validate a config, expand it into cells.

A workflow config names datasets, models and optimizer entries (each with its own
hyperparameters), seeds, and settings shared by every cell. A cell's settings are merged
in this order, later winning (mappings such as ``opt_args`` are merged key by key):

    CellConfig defaults → the dataset's recipe (its registry entry) → ``train`` →
    ``datasets.<d>`` → ``models.<m>`` → ``optimizers.<label>`` →
    each ``overrides`` entry whose ``when`` matches, in order.

:func:`load_grid` checks the config against the schema
(:mod:`zsharp.pipeline.grid.schema`) and then every cell's
:class:`~zsharp.pipeline.cell.config.CellConfig` by the registries' rules (no PyTorch, so
a dry run of a large grid stays fast); the first problem is raised as a ``GridError``
whose one-line message starts with the offending key, before any job starts. Each job
then builds its own cell's optimizer and model before it trains.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsharp.data.registry import get_spec
from zsharp.models.registry import TIMM_PREFIX, is_timm
from zsharp.optim.args import as_number
from zsharp.optim.registry import OPTIMIZERS
from zsharp.pipeline.cell.config import (
    SETTINGS,
    CellConfig,
    ConfigError,
    cell_config,
)
from zsharp.pipeline.grid.matched import check_matches, matched_settings
from zsharp.pipeline.grid.published import Reference, check_published
from zsharp.pipeline.grid.schema import MAX_CELLS, GridError, check_schema

MAPPING_SETTINGS = ("opt_args", "model_args")
# the grid's comparison when the config names none: every ZSharp entry against SAM
DEFAULT_BASELINE = "sam"
CANDIDATE_PREFIX = "zsharp"


@dataclass(frozen=True)
class Cell:
    """One dataset × model × optimizer entry × seed of the grid."""

    dataset: str
    model: str
    label: str  # the optimizer entry's name in the config
    seed: int
    config: CellConfig = field(compare=False)
    # a matched control: the entry whose ‖ε‖ its ρ equals, and how it was chosen
    matched: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        """``dataset/model/label/seedN``: the cell's path below the experiment."""
        return f"{self.dataset}/{self.model}/{self.label}/seed{self.seed}"

    def config_json(self) -> str:
        """The cell's whole resolved configuration, as ``zsharp train --config`` reads it."""
        return json.dumps(self.config.to_dict(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Sweep:
    """An entry expanded from a swept one: its family (the swept entry's label) and the
    values it takes."""

    family: str
    values: dict[str, Any]


@dataclass
class Grid:
    """A validated workflow config and its cells."""

    config: dict[str, Any]
    cells: list[Cell]
    sweeps: dict[str, Sweep] = field(default_factory=dict)  # label → its sweep
    published: list[Reference] = field(default_factory=list)
    matches: dict[str, str] = field(default_factory=dict)  # matched entry → the one it matches

    @property
    def experiment_dir(self) -> Path:
        return Path(self.config["results_dir"]) / self.config["experiment"]

    def cell(self, dataset: str, model: str, label: str, seed: int | str) -> Cell:
        return self._index[(dataset, model, label, int(seed))]

    def __post_init__(self) -> None:
        self._index = {(c.dataset, c.model, c.label, c.seed): c for c in self.cells}


# --- the cells -----------------------------------------------------------------------------


def _merge(
    settings: dict[str, Any], source: dict[str, str], layer: dict[str, Any] | None, where: str
) -> None:
    """Merge ``layer`` into ``settings``, remembering where each key came from."""
    for key, value in (layer or {}).items():
        if key in MAPPING_SETTINGS:
            merged = dict(settings.get(key, {}))
            merged.update(value or {})
            settings[key] = merged
            for sub in value or {}:
                source[f"{key}.{sub}"] = f"{where}.{key}.{sub}"
        else:
            settings[key] = value
        source[key] = f"{where}.{key}"


def cell_settings(
    config: dict[str, Any], dataset: str, model: str, label: str
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(optimizer name, merged settings, where each setting came from) for one cell."""
    entry = dict(config["optimizers"][label] or {})
    optimizer = entry.pop("optimizer", label)
    entry.pop("match", None)  # the entry's ρ: zsharp.pipeline.grid.matched
    settings: dict[str, Any] = {}
    source: dict[str, str] = {}
    _merge(settings, source, config.get("train"), "train")
    _merge(settings, source, config["datasets"][dataset], f"datasets.{dataset}")
    _merge(settings, source, config["models"][model], f"models.{model}")
    _merge(settings, source, entry, f"optimizers.{label}")
    for i, override in enumerate(config.get("overrides") or []):
        when = override.get("when", {})
        if all(
            {"dataset": dataset, "model": model, "optimizer": label}[k] == v
            for k, v in when.items()
        ):
            _merge(settings, source, override.get("set"), f"overrides.{i}.set")
    settings.pop("source", None)  # a dataset's download mirror, not a training setting
    return optimizer, settings, source


def _unswept(error: GridError, label: str, sweep: Sweep | None) -> GridError:
    """An error of an expanded entry, addressed to the swept entry the user wrote."""
    if sweep is None:
        return error
    text = str(error).replace(f"optimizers.{label}.", f"optimizers.{sweep.family}.", 1)
    for key in sweep.values:
        for form in (f".opt_args.{key}:", f".{key}:"):
            text = text.replace(f"optimizers.{sweep.family}{form}",
                                f"optimizers.{sweep.family}.sweep.{key}:", 1)  # fmt: skip
    return GridError(text)


def _located(error: ConfigError, source: dict[str, str], cell: str, fallback: str) -> GridError:
    """The cell's error, re-addressed to the config key the bad value came from."""
    key, _, detail = str(error).partition(": ")
    where = source.get(key) or source.get(key.split(".")[0]) or fallback
    return GridError(f"{where}: {detail} (cell {cell})")


@functools.cache
def _cell(dataset: str, model: str, optimizer: str, frozen: str) -> CellConfig:
    return cell_config(dataset, model, optimizer, deep=False, **json.loads(frozen))


# short names of swept keys in the labels they make (zsharp-p90, as the paper names them)
_SHORT = {"percentile": "p", "label_noise": "noise"}


def _number_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expand_sweeps(optimizers: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Sweep]]:
    """Optimizer entries with every ``sweep`` expanded into one entry per combination.

    A swept key that is an argument of the entry's optimizer goes into its ``opt_args``,
    any other into its settings. Labels are ``<label>-<short key><value>``, so adding a value
    adds entries and leaves the others' labels (and cached cells) as they were.
    """
    entries: dict[str, Any] = {}
    sweeps: dict[str, Sweep] = {}
    for label, entry in optimizers.items():
        entry = dict(entry or {})
        sweep = entry.pop("sweep", None)
        if not sweep:
            entries[label] = entry
            continue
        name = entry.get("optimizer", label)
        settings = {a.name for a in SETTINGS}
        own = (OPTIMIZERS[name].arg_names if name in OPTIMIZERS else frozenset()) - settings
        keys = list(sweep)
        for combination in itertools.product(*(sweep[k] for k in keys)):
            values = dict(zip(keys, (as_number(v) for v in combination), strict=True))
            suffix = "-".join(f"{_SHORT.get(k, k)}{_number_text(v)}" for k, v in values.items())
            expanded = {**entry, "optimizer": name, "opt_args": dict(entry.get("opt_args") or {})}
            for key, value in values.items():
                (expanded["opt_args"] if key in own else expanded)[key] = value
            if f"{label}-{suffix}" in optimizers:
                raise GridError(f"optimizers.{label}.sweep: makes {label}-{suffix}, which is "
                                "also an entry of its own")  # fmt: skip
            entries[f"{label}-{suffix}"] = expanded
            sweeps[f"{label}-{suffix}"] = Sweep(label, values)
    return entries, sweeps


# the sensitivity plots of the aggregate: one per swept key of a family and dataset
SENSITIVITY_PLOT = "sensitivity_{family}_{param}_{dataset}.png"
# the aggregate's plot of accuracy against ‖ε‖: one per dataset and model
EPSILON_PLOT = "accuracy_vs_epsilon_{dataset}_{model}.png"


def sensitivity_plots(grid: Grid) -> list[tuple[str, str, str]]:
    """(family, swept key, dataset) of every sensitivity plot of ``grid``'s aggregate."""
    families: dict[str, list[str]] = {}
    for sweep in grid.sweeps.values():
        families.setdefault(sweep.family, list(sweep.values))
    return [
        (family, key, dataset)
        for family, keys in families.items()
        for key in keys
        for dataset in grid.config["datasets"]
    ]


def aggregate_document(config: dict[str, Any]) -> str:
    """The parts of a workflow config (as written, sweeps unexpanded) that the aggregate
    reads through ``zsharp aggregate --grid``: names, entries, comparison, published results;
    none of the runtime or W&B settings, so changing those reruns nothing."""
    document = {
        "seeds": config["seeds"],
        "datasets": dict.fromkeys(config["datasets"]),
        "models": dict.fromkeys(config["models"]),
        "optimizers": config["optimizers"],
    }
    for key in ("compare", "published"):
        if config.get(key):
            document[key] = config[key]
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def count_cells(config: Any) -> tuple[int, str] | None:
    """(number of cells, the product that makes it) of a config as written, sweeps
    expanded, or None where the config's shape is too wrong to count (the schema then
    says why). A few operations, whatever the grid's size."""
    if not isinstance(config, dict):
        return None
    sizes = {}
    for key in ("datasets", "models", "seeds"):
        value = config.get(key)
        if not isinstance(value, (dict, list)):
            return None
        sizes[key] = len(value)
    entries = config.get("optimizers")
    if not isinstance(entries, dict):
        return None
    count = 0
    for entry in entries.values():
        sweep = (entry or {}).get("sweep") if isinstance(entry, dict) else None
        size = 1
        if isinstance(sweep, dict):
            for values in sweep.values():
                size *= len(values) if isinstance(values, list) else 1
        count += size
    total = sizes["datasets"] * sizes["models"] * count * sizes["seeds"]
    product = (
        f"{sizes['datasets']:,} datasets × {sizes['models']:,} models × {count:,} optimizer "
        f"entries × {sizes['seeds']:,} seeds"
    )
    return total, product


def _check_size(config: Any) -> None:
    """Refuse a grid above ``max_cells`` before anything else reads it whole."""
    counted = count_cells(config)
    limit = config.get("max_cells", MAX_CELLS) if isinstance(config, dict) else MAX_CELLS
    if counted is None or not isinstance(limit, int) or isinstance(limit, bool):
        return  # the schema names what is wrong
    total, product = counted
    if total > limit:
        raise GridError(
            f"max_cells: the grid has {total:,} cells ({product}), more than max_cells "
            f"({limit:,}); split it into several configs or raise max_cells"
        )


def load_grid(config: Any, cells: bool = True) -> Grid:
    """Validate ``config`` (its size, the schema, then every cell's settings) and expand
    the grid.

    With ``cells=False`` only the config is checked and expanded (its sweeps, comparison
    and published references; what the aggregate reads), not each cell's settings.
    """
    _check_size(config)
    config = check_schema(config)
    config["optimizers"], sweeps = expand_sweeps(config["optimizers"])
    _check_references(config, sweeps)
    published = check_published(config)
    matches = check_matches(config["optimizers"])
    if not cells:
        return Grid(config, [], sweeps, published, matches)
    _check_places(config)
    grid_cells = []
    for dataset in config["datasets"]:
        for model in config["models"]:
            # matched entries last: their ρ comes from the cells of the entries they match
            labels = sorted(config["optimizers"], key=lambda label: label in matches)
            resolved: dict[str, CellConfig] = {}
            for label in labels:
                optimizer, settings, source = cell_settings(config, dataset, model, label)
                matched = None
                if label in matches:
                    target = resolved[matches[label]]
                    settings, matched = matched_settings(
                        label, matches[label], optimizer, settings, target.optimizer,
                        target.opt_args, dataset, model, target.model_args,
                    )  # fmt: skip
                for i, seed in enumerate(config["seeds"]):
                    source["seed"] = f"seeds.{i}"
                    try:
                        cfg = _cell(
                            dataset, model, optimizer,
                            json.dumps({**settings, "seed": seed}, sort_keys=True),
                        )  # fmt: skip
                    except ConfigError as error:
                        where = f"{dataset}/{model}/{label}"
                        located = _located(error, source, where, f"optimizers.{label}.optimizer")
                        raise _unswept(located, label, sweeps.get(label)) from None
                    resolved.setdefault(label, cfg)
                    grid_cells.append(
                        Cell(dataset, model, label, seed, copy.deepcopy(cfg), matched)
                    )
    # the config's order (datasets, models, entries, seeds), matched entries in their place
    order = {k: {v: i for i, v in enumerate(config[k])} for k in ("datasets", "models")}
    entries = {label: i for i, label in enumerate(config["optimizers"])}
    grid_cells.sort(
        key=lambda c: (order["datasets"][c.dataset], order["models"][c.model], entries[c.label])
    )
    return Grid(config, grid_cells, sweeps, published, matches)


_NAME_MAX = 255  # the longest folder name common file systems allow


def _check_places(config: dict[str, Any]) -> None:
    """What a job would refuse, refused before any job starts: roots that are files or leave
    the working folder, names too long to be folders, a download source for an embedded
    dataset, a timm model timm does not know."""
    for key in ("results_dir", "data_root"):
        path = Path(config[key]).expanduser()
        if not path.is_absolute() and ".." in path.parts:
            raise GridError(
                f"{key}: {config[key]!r} leaves the working folder; write an absolute path "
                "to put it elsewhere"
            )
        if path.exists() and not path.is_dir():
            raise GridError(f"{key}: {config[key]!r} is a file, not a folder")
    for key, names in (
        ("experiment", [config["experiment"]]),
        ("optimizers", list(config["optimizers"])),
        ("models", list(config["models"])),
    ):
        for name in names:
            size = len(str(name).encode())
            if size > _NAME_MAX:
                raise GridError(
                    f"{key}: {str(name)[:40]!r}… is {size} bytes long; a folder name may "
                    f"have at most {_NAME_MAX}"
                )
    for dataset, settings in config["datasets"].items():
        if (settings or {}).get("source") and not get_spec(dataset).needs_network:
            raise GridError(
                f"datasets.{dataset}.source: {dataset} is embedded (nothing to download); "
                "remove source"
            )
    timm_models = [m for m in config["models"] if is_timm(m)]
    if timm_models:  # imports timm (and PyTorch) only for a grid that names a timm model
        import timm

        for model in timm_models:
            name = model.removeprefix(TIMM_PREFIX)
            if not timm.is_model(name):
                raise GridError(
                    f"models: {model!r}: timm has no model {name!r} (timm.list_models() names them)"
                )


def _check_references(config: dict[str, Any], sweeps: dict[str, Sweep]) -> None:
    """Names that must point into the grid: the comparison's entries (a candidate may name a
    swept entry: all its values), overrides' `when`."""
    compare = config.get("compare") or {}
    families = {sweep.family for sweep in sweeps.values()}
    baseline = compare.get("baseline")
    if baseline and baseline not in config["optimizers"] and baseline not in families:
        raise GridError(f"compare.baseline: {baseline!r} is not an optimizers entry")
    for i, label in enumerate(compare.get("candidates") or []):
        if label not in config["optimizers"] and label not in families:
            raise GridError(f"compare.candidates.{i}: {label!r} is not an optimizers entry")
    sections = {"dataset": "datasets", "model": "models", "optimizer": "optimizers"}
    for i, override in enumerate(config.get("overrides") or []):
        for key, value in override["when"].items():
            if value not in config[sections[key]]:
                raise GridError(
                    f"overrides.{i}.when.{key}: {value!r} is not one of the grid's "
                    f"{sections[key]} {list(config[sections[key]])}"
                )


def comparison(
    entries: dict[str, str], baseline: str | None = None, candidates: list[str] | None = None
) -> tuple[str | None, list[str]]:
    """The paired comparison: (baseline entry, candidate entries) among ``entries``
    (label → optimizer name). By default every ZSharp entry against the SAM entry; no
    baseline (None) when there is no such entry."""
    baseline = baseline or DEFAULT_BASELINE
    if baseline not in entries:
        return None, []
    if candidates is None:
        candidates = [label for label, name in entries.items() if name.startswith(CANDIDATE_PREFIX)]
    return baseline, [c for c in candidates if c != baseline]


def comparison_pairs(grid: Grid) -> list[tuple[str, str]]:
    """The (candidate, baseline) pairs of a grid's comparison. A swept baseline (its
    entry's name, e.g. ``sgd`` swept over ``label_noise``) pairs each candidate with its
    member of the same swept values (``sam-noise0.2`` with ``sgd-noise0.2``)."""
    compare = grid.config.get("compare") or {}
    families: dict[str, list[str]] = {}
    for label, sweep in grid.sweeps.items():
        families.setdefault(sweep.family, []).append(label)
    baseline = compare.get("baseline")
    if baseline not in families:
        base, candidates = grid_comparison(grid)
        return [(c, base) for c in candidates] if base is not None else []
    entries = {
        label: (entry or {}).get("optimizer", label)
        for label, entry in grid.config["optimizers"].items()
    }
    named = compare.get("candidates")
    if named is None:
        candidates = [c for c, name in entries.items() if name.startswith(CANDIDATE_PREFIX)]
    else:
        candidates = [c for name in named for c in families.get(name, [name])]
    by_values = {
        json.dumps(grid.sweeps[label].values, sort_keys=True): label for label in families[baseline]
    }
    pairs = []
    for candidate in candidates:
        sweep = grid.sweeps.get(candidate)
        base = by_values.get(json.dumps(sweep.values, sort_keys=True)) if sweep else None
        if base is not None and candidate != base:
            pairs.append((candidate, base))
    return pairs


def grid_comparison(grid: Grid) -> tuple[str | None, list[str]]:
    """:func:`comparison` of a grid's optimizer entries and its ``compare`` section."""
    entries = {
        label: (entry or {}).get("optimizer", label)
        for label, entry in grid.config["optimizers"].items()
    }
    compare = grid.config.get("compare") or {}
    candidates = compare.get("candidates")
    if candidates is not None:  # a swept entry's name stands for all its values
        families: dict[str, list[str]] = {}
        for label, sweep in grid.sweeps.items():
            families.setdefault(sweep.family, []).append(label)
        candidates = [c for name in candidates for c in families.get(name, [name])]
    return comparison(entries, compare.get("baseline"), candidates)
