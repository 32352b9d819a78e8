"""The workflow config's JSON Schema and its validation.

The schema is a skeleton shipped with the package (``config.schema.yaml``: the sections and
their structure) whose names and settings are filled from the registries of datasets,
models and optimizers and from the cell's settings
(:data:`zsharp.pipeline.cell.config.SETTINGS`), so each rule is written once.
:func:`check_schema` validates a config against it and reports the first problem in one
line that starts with the dotted path of the offending key (:class:`GridError`); numbers
written as text (``1e-3``, which YAML 1.1 reads as a string) are numbers.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from zsharp.data.registry import DATASETS
from zsharp.models.registry import MODELS, TIMM_PREFIX
from zsharp.optim.args import Arg, as_number, is_number
from zsharp.optim.registry import OPTIMIZERS
from zsharp.pipeline.cell.config import EVALUATE, MAX_SEED, SETTINGS
from zsharp.pipeline.plugins import load_plugins

SKELETON = Path(__file__).resolve().parent / "config.schema.yaml"
# the default bound on a grid's cells (max_cells): about 50 s of Snakemake dry run
MAX_CELLS = 10_000


class GridError(ValueError):
    """An invalid workflow config; the message names the key."""


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
    props["max_cells"]["default"] = MAX_CELLS
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
    return is_number(value) or (isinstance(value, str) and as_number(value) != value)


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
