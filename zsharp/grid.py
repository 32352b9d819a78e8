"""The experiment grid of the Snakemake workflow: validate a config, expand it into cells.

A workflow config names datasets, models and optimizer entries (each with its own
hyperparameters), seeds, and settings shared by every cell. A cell's settings are merged
in this order, later winning (mappings such as ``opt_args`` are merged key by key):

    CellConfig defaults → the dataset's recipe (its registry entry) → ``train`` →
    ``datasets.<d>`` → ``models.<m>`` → ``optimizers.<label>`` →
    each ``overrides`` entry whose ``when`` matches, in order.

:func:`load_grid` checks the config against the schema (:func:`schema`: a skeleton shipped
with the package, its names and settings filled from the registries) and then every cell's
:class:`~zsharp.config.CellConfig` by the registries' rules (no PyTorch, so a dry run of a
large grid stays fast); the first problem is raised as a :class:`GridError` whose one-line
message starts with the offending key, before any job starts. Each job then builds its own
cell's optimizer and model before it trains.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from zsharp.config import (
    EVALUATE,
    MAX_SEED,
    SETTINGS,
    CellConfig,
    ConfigError,
    cell_config,
)
from zsharp.data.registry import DATASETS, get_spec
from zsharp.models.registry import MODELS, TIMM_PREFIX, is_timm
from zsharp.optim.args import Arg, as_number
from zsharp.optim.registry import OPTIMIZERS
from zsharp.plugins import load_plugins

MAPPING_SETTINGS = ("opt_args", "model_args")
SKELETON = Path(__file__).resolve().parent / "config.schema.yaml"
# the grid's comparison when the config names none: every ZSharp entry against SAM
DEFAULT_BASELINE = "sam"
CANDIDATE_PREFIX = "zsharp"


class GridError(ValueError):
    """An invalid workflow config; the message names the key."""


@dataclass(frozen=True)
class Cell:
    """One dataset × model × optimizer entry × seed of the grid."""

    dataset: str
    model: str
    label: str  # the optimizer entry's name in the config
    seed: int
    config: CellConfig = field(compare=False)

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


@dataclass
class Grid:
    """A validated workflow config and its cells."""

    config: dict[str, Any]
    cells: list[Cell]
    sweeps: dict[str, Sweep] = field(default_factory=dict)  # label → its sweep
    published: list[Reference] = field(default_factory=list)

    @property
    def experiment_dir(self) -> Path:
        return Path(self.config["results_dir"]) / self.config["experiment"]

    def cell(self, dataset: str, model: str, label: str, seed: int | str) -> Cell:
        return self._index[(dataset, model, label, int(seed))]

    def __post_init__(self) -> None:
        self._index = {(c.dataset, c.model, c.label, c.seed): c for c in self.cells}


# --- the schema ----------------------------------------------------------------------------


def _union(args: list[Arg]) -> dict[str, Any]:
    """One schema property per argument name (the first registration's rule; defaults are
    per optimizer and left out)."""
    out: dict[str, Any] = {}
    for arg in args:
        if arg.name not in out:
            fragment = arg.schema()
            out[arg.name] = fragment
    return out


def schema() -> dict[str, Any]:
    """The workflow config's JSON Schema: the skeleton, filled from the registries."""
    load_plugins()
    doc = yaml.safe_load(SKELETON.read_text())
    props, defs = doc["properties"], doc["$defs"]
    props["seeds"]["items"]["maximum"] = MAX_SEED
    props["datasets"]["propertyNames"] = {"enum": list(DATASETS)}
    props["models"]["propertyNames"] = {
        "anyOf": [{"enum": list(MODELS)}, {"pattern": f"^{TIMM_PREFIX}[A-Za-z0-9_.-]+$"}]
    }
    props["evaluate"]["properties"] = {
        a.name: {**a.schema(), "default": a.default} for a in EVALUATE
    }
    defs["optimizer_entry"]["oneOf"][1]["properties"]["optimizer"] = {"enum": list(OPTIMIZERS)}
    settings = {a.name: a.schema() for a in SETTINGS}
    settings["opt_args"] = {"$ref": "#/$defs/opt_args"}
    settings["model_args"] = {"type": "object", "description": "the model's options"}
    defs["settings_keys"]["properties"] = settings
    sam_family = [a for info in OPTIMIZERS.values() if not info.is_base for a in info.args]
    base = [a for info in OPTIMIZERS.values() if info.is_base for a in info.args]
    top_level = {"lr", "weight_decay", "momentum"}
    defs["opt_args"]["properties"] = _union(
        sam_family + [a for a in base if a.name not in top_level]
    )
    return doc


def _coerced(keyword: str) -> Any:
    """A bound keyword (minimum, …) that reads numbers written as text (``1e-3``)."""
    check = jsonschema.Draft202012Validator.VALIDATORS[keyword]
    return lambda validator, bound, instance, sch: check(validator, bound, as_number(instance), sch)


def _is_number(checker: Any, value: Any) -> bool:
    """YAML 1.1 reads `lr: 1e-3` as text: such text is a number wherever one is expected."""
    base = jsonschema.Draft202012Validator.TYPE_CHECKER
    return base.is_type(value, "number") or (isinstance(value, str) and as_number(value) != value)


def _is_integer(checker: Any, value: Any) -> bool:
    """An integer is an int, as for zsharp.optim.args.Arg (JSON Schema would take 1.0)."""
    return isinstance(value, int) and not isinstance(value, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"number": _is_number, "integer": _is_integer}
    ),
    validators={
        k: _coerced(k) for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    },
)


def _where(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    """One line that starts with the dotted path of the offending key."""
    path = [str(p) for p in error.absolute_path]
    names = re.findall(r"'([^']+)'", error.message)
    if error.validator == "required" and names:
        return f"{'.'.join([*path, names[0]])}: required but missing"
    if error.validator in ("additionalProperties", "unevaluatedProperties") and names:
        return f"{'.'.join([*path, names[0]])}: unknown key"
    if "propertyNames" in error.relative_schema_path:
        return f"{_where(path)}: {error.instance!r} is not a valid name ({error.message})"
    return f"{_where(path)}: {error.message}"


def check_schema(config: Any, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``config``; return a copy with the schema's defaults filled in."""
    if not isinstance(config, dict):
        raise GridError(f"(top level): the config must be a mapping, got {config!r}")
    doc = doc if doc is not None else schema()
    validator = _Validator(doc)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    # "null or settings" alternatives: report what is wrong with the settings, not that
    # the value is not null
    while error is not None and error.validator in ("oneOf", "anyOf") and error.context:
        real = [
            e for e in error.context if not (e.validator == "type" and e.validator_value == "null")
        ]
        if not real or "propertyNames" in error.relative_schema_path:
            break
        error = jsonschema.exceptions.best_match(real)
    if error is not None:
        raise GridError(_describe(error))
    return _with_defaults(copy.deepcopy(config), doc)


def _with_defaults(config: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """Fill the defaults the schema declares for top-level sections and their keys."""
    for key, spec in doc.get("properties", {}).items():
        if key not in config and "default" in spec:
            config[key] = copy.deepcopy(spec["default"])
        if isinstance(config.get(key), dict) and "properties" in spec:
            for sub, sub_spec in spec["properties"].items():
                if sub not in config[key] and "default" in sub_spec:
                    config[key][sub] = copy.deepcopy(sub_spec["default"])
    return config


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
_SHORT = {"percentile": "p"}


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


def load_grid(config: Any, cells: bool = True) -> Grid:
    """Validate ``config`` (schema, then every cell's settings) and expand the grid.

    With ``cells=False`` only the config is checked and expanded (its sweeps, comparison
    and published references; what the aggregate reads), not each cell's settings.
    """
    config = check_schema(config)
    config["optimizers"], sweeps = expand_sweeps(config["optimizers"])
    _check_references(config, sweeps)
    published = _check_published(config)
    if not cells:
        return Grid(config, [], sweeps, published)
    _check_places(config)
    grid_cells = []
    for dataset in config["datasets"]:
        for model in config["models"]:
            for label in config["optimizers"]:
                optimizer, settings, source = cell_settings(config, dataset, model, label)
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
                    grid_cells.append(Cell(dataset, model, label, seed, copy.deepcopy(cfg)))
    return Grid(config, grid_cells, sweeps, published)


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
    if compare.get("baseline") and compare["baseline"] not in config["optimizers"]:
        raise GridError(f"compare.baseline: {compare['baseline']!r} is not an optimizers entry")
    families = {sweep.family for sweep in sweeps.values()}
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


def _check_published(config: dict[str, Any]) -> list[Reference]:
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
