"""The experiment grid of the Snakemake workflow: validate a config, expand it into cells.

A workflow config names datasets, models and optimizer entries (each with its own
hyperparameters), seeds, and settings shared by every cell. A cell's settings are merged
in this order, later winning (mappings such as ``opt_args`` are merged key by key):

    CellConfig defaults → the dataset's defaults (``zsharp.config.DATASET_DEFAULTS``) →
    ``train`` → ``datasets.<d>`` → ``models.<m>`` → ``optimizers.<label>`` →
    each ``overrides`` entry whose ``when`` matches, in order.

:func:`load_grid` checks the config against ``workflow/schemas/config.schema.yaml`` and then
every cell's :class:`~zsharp.config.CellConfig` against ``zsharp.catalog`` (no PyTorch, so a
dry run of a large grid stays fast); the first problem is raised as a :class:`GridError`
whose one-line message starts with the offending key, before any job starts. Each job then
checks its own cell in depth (building optimizer and model) before it trains.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from zsharp.config import CellConfig, ConfigError, cell_config

MAPPING_SETTINGS = ("opt_args", "model_args")
SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


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


@dataclass
class Grid:
    """A validated workflow config and its cells."""

    config: dict[str, Any]
    cells: list[Cell]

    @property
    def experiment_dir(self) -> Path:
        return Path(self.config["results_dir"]) / self.config["experiment"]

    def cell(self, dataset: str, model: str, label: str, seed: int | str) -> Cell:
        return self._index[(dataset, model, label, int(seed))]

    def __post_init__(self) -> None:
        self._index = {(c.dataset, c.model, c.label, c.seed): c for c in self.cells}


def load_schema(path: Path = SCHEMA) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


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


def check_schema(config: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config``; return a copy with the schema's defaults filled in."""
    if not isinstance(config, dict):
        raise GridError(f"(top level): the config must be a mapping, got {config!r}")
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    # "null or settings" alternatives: report what is wrong with the settings, not that
    # the value is not null
    while error is not None and error.validator in ("oneOf", "anyOf") and error.context:
        real = [
            e for e in error.context if not (e.validator == "type" and e.validator_value == "null")
        ]
        error = jsonschema.exceptions.best_match(real) if real else error
        if not real:
            break
    if error is not None:
        raise GridError(_describe(error))
    return _with_defaults(copy.deepcopy(config), schema)


def _with_defaults(config: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Fill the defaults the schema declares for top-level sections and their keys."""
    for key, spec in schema.get("properties", {}).items():
        if key not in config and "default" in spec:
            config[key] = copy.deepcopy(spec["default"])
        if isinstance(config.get(key), dict) and "properties" in spec:
            for sub, sub_spec in spec["properties"].items():
                if sub not in config[key] and "default" in sub_spec:
                    config[key][sub] = copy.deepcopy(sub_spec["default"])
    return config


def _merge(
    settings: dict[str, Any], source: dict[str, str], layer: dict[str, Any] | None, where: str
) -> None:
    """Merge ``layer`` into ``settings``, remembering where each key came from."""
    for key, value in (layer or {}).items():
        if key in MAPPING_SETTINGS:
            merged = dict(settings.get(key, {}))
            merged.update(value or {})
            settings[key] = merged
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


def load_grid(config: dict[str, Any], schema_path: Path = SCHEMA) -> Grid:
    """Validate ``config`` (schema, then every cell's settings) and expand the grid."""
    config = check_schema(config, load_schema(schema_path))
    cells = []
    for dataset in config["datasets"]:
        for model in config["models"]:
            for label in config["optimizers"]:
                optimizer, settings, source = cell_settings(config, dataset, model, label)
                for seed in config["seeds"]:
                    try:
                        cfg = cell_config(
                            dataset, model, optimizer, seed=seed, deep=False, **settings
                        )
                    except ConfigError as error:
                        key = str(error).split(":", 1)[0]
                        where = source.get(key, f"optimizers.{label}.optimizer")
                        detail = str(error).split(":", 1)[1].strip()
                        raise GridError(
                            f"{where}: {detail} (cell {dataset}/{model}/{label})"
                        ) from None
                    cells.append(Cell(dataset, model, label, seed, cfg))
    _check_compare(config)
    _check_overrides(config)
    return Grid(config, cells)


def _check_overrides(config: dict[str, Any]) -> None:
    """A `when` that names no dataset, model or optimizer entry of the grid is a typo."""
    sections = {"dataset": "datasets", "model": "models", "optimizer": "optimizers"}
    for i, override in enumerate(config.get("overrides") or []):
        for key, value in override["when"].items():
            if value not in config[sections[key]]:
                raise GridError(
                    f"overrides.{i}.when.{key}: {value!r} is not one of the grid's "
                    f"{sections[key]} {list(config[sections[key]])}"
                )


def _check_compare(config: dict[str, Any]) -> None:
    compare = config.get("compare") or {}
    for key in ("baseline",):
        if compare.get(key) and compare[key] not in config["optimizers"]:
            raise GridError(f"compare.{key}: {compare[key]!r} is not an optimizers entry")
    for i, label in enumerate(compare.get("candidates") or []):
        if label not in config["optimizers"]:
            raise GridError(f"compare.candidates.{i}: {label!r} is not an optimizers entry")


def _flag_value(value: Any) -> str:
    """A value as the command line reads it back (YAML: 0.05, true, [0.9, 0.999], paper)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def train_arguments(cell: Cell) -> list[str]:
    """The ``zsharp train`` flags that reproduce ``cell.config`` exactly."""
    cfg = cell.config.to_dict()
    args = [
        "--dataset", cfg.pop("dataset"), "--model", cfg.pop("model"),
        "--optimizer", cfg.pop("optimizer"),
    ]  # fmt: skip
    for key, value in cfg.items():
        if key in MAPPING_SETTINGS:
            flag = "--opt" if key == "opt_args" else "--model-arg"
            for name, item in value.items():
                args += [flag, f"{name}={_flag_value(item)}"]
        else:
            args += [f"--{key.replace('_', '-')}", _flag_value(value)]
    return args
