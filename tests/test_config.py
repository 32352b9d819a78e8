"""The configuration layer: the catalog matches the code, the grid expands and round-trips."""

from __future__ import annotations

import inspect
import re
from dataclasses import fields

import pytest
import torch
import yaml

from tests.workflow_helpers import REPO, tiny_config
from zsharp import catalog
from zsharp.cli import build_parser
from zsharp.config import CellConfig, ConfigError, cell_config
from zsharp.data import DATASETS
from zsharp.grid import SCHEMA, cell_settings, check_schema, load_grid, train_arguments
from zsharp.models import _REGISTRY, MODEL_NAMES
from zsharp.optim import OPTIMIZERS, create
from zsharp.optim.factory import BASE_OPTIMIZERS

SCHEMA_DOC = yaml.safe_load(SCHEMA.read_text())


def test_catalog_datasets_match_the_registry() -> None:
    assert {
        name: (spec.image_size, spec.channels, spec.num_classes) for name, spec in DATASETS.items()
    } == catalog.DATASET_SHAPES


def test_catalog_models_match_the_registry() -> None:
    assert set(MODEL_NAMES) == set(catalog.MODEL_OPTIONS)
    assert {name: allowed for name, (_, allowed) in _REGISTRY.items()} == catalog.MODEL_OPTIONS


@pytest.mark.parametrize("base", list(BASE_OPTIMIZERS))
def test_catalog_accepts_every_argument_of_the_base_optimizers(base: str) -> None:
    signature = inspect.signature(BASE_OPTIMIZERS[base].__init__).parameters
    assert set(signature) - {"self", "params"} <= catalog.BASE_ARGS[base]


@pytest.mark.parametrize("name", catalog.SAM_ARGS)
def test_catalog_sam_arguments_are_what_create_accepts(name: str) -> None:
    values = {
        "rho": 0.1,
        "adaptive": True,
        "eta": 0.01,
        "percentile": 90.0,
        "variant": "official",
        "sigma": 0.5,
        "lmbda": 0.5,
    }
    params = [torch.nn.Parameter(torch.zeros(3))]
    create(name, params, **{k: values[k] for k in catalog.SAM_ARGS[name]})
    others = set(values) - catalog.SAM_ARGS[name]
    for key in others:
        with pytest.raises(ValueError, match=key):
            create(name, params, **{key: values[key]})
    assert set(OPTIMIZERS) == set(catalog.OPTIMIZERS)


def test_schema_settings_are_the_cell_config_fields() -> None:
    settings = set(SCHEMA_DOC["$defs"]["settings_keys"]["properties"])
    assert settings == {f.name for f in fields(CellConfig)} - {
        "dataset",
        "model",
        "optimizer",
        "seed",
    }


def test_schema_names_match_the_catalog() -> None:
    props = SCHEMA_DOC["properties"]
    assert props["datasets"]["propertyNames"]["enum"] == list(catalog.DATASET_SHAPES)
    entry = SCHEMA_DOC["$defs"]["optimizer_entry"]["oneOf"][1]
    assert entry["properties"]["optimizer"]["enum"] == list(catalog.OPTIMIZERS)
    pattern = re.compile(props["models"]["propertyNames"]["pattern"])
    assert all(pattern.match(name) for name in catalog.MODEL_OPTIONS)
    assert pattern.match("timm:resnet18") and not pattern.match("resnet21")


@pytest.mark.parametrize("path", ["config/config.yaml", "config/paper.yaml", "config/sgd.yaml"])
def test_shipped_configs_are_valid_and_every_cell_round_trips_the_command_line(path) -> None:
    grid = load_grid(yaml.safe_load((REPO / path).read_text()))
    parser = build_parser()
    seen = set()
    for cell in grid.cells:
        if (cell.dataset, cell.model, cell.label) in seen:
            continue
        seen.add((cell.dataset, cell.model, cell.label))
        args = parser.parse_args(["train", *train_arguments(cell), "--out", "x"])
        overrides = {
            f.name: getattr(args, f.name)
            for f in fields(CellConfig)
            if f.name not in ("dataset", "model", "optimizer") and getattr(args, f.name) is not None
        }
        for key in ("opt_args", "model_args"):
            overrides[key] = dict(overrides.get(key) or [])
        again = cell_config(args.dataset, args.model, args.optimizer, deep=False, **overrides)
        assert again.digest() == cell.config.digest(), cell.key


def test_settings_merge_in_documented_order() -> None:
    config = check_schema(
        tiny_config(
            train={"epochs": 2, "lr": 0.1, "opt_args": {"rho": 0.2}},
            datasets={"digits": {"epochs": 3}},
            models={"resnet20": {"lr": 0.3}},
            optimizers={"zsharp": {"lr": 0.4, "opt_args": {"percentile": 90.0}}},
            overrides=[
                {
                    "when": {"optimizer": "zsharp", "dataset": "digits"},
                    "set": {"epochs": 5, "opt_args": {"rho": 0.5}},
                },
                {"when": {"model": "vit"}, "set": {"epochs": 99}},
            ],
        ),
        SCHEMA_DOC,
    )
    optimizer, settings, source = cell_settings(config, "digits", "resnet20", "zsharp")
    assert optimizer == "zsharp"
    assert settings["epochs"] == 5 and settings["lr"] == 0.4
    assert settings["opt_args"] == {"rho": 0.5, "percentile": 90.0}
    assert source["epochs"] == "overrides.0.set.epochs"


def test_deep_validation_builds_the_optimizer_and_the_model() -> None:
    # names pass the catalog, but the model cannot be built at this size
    with pytest.raises(ConfigError, match="model_args"):
        cell_config("digits", "vit", "sgd", model_args={"patch_size": 8, "dropout": -1.0})
    cell_config("digits", "vit", "sgd", model_args={"patch_size": 2})
