"""A catalogue of invalid workflow configs: each fails before any job, naming the key.

The catalogue runs in-process through :func:`zsharp.pipeline.grid.expand.load_grid` (what
the workflow's common.smk calls); the real ``snakemake`` proves the wiring once: an invalid
config stops it with that one line and nothing created.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.workflow_helpers import REPO, snakemake, tiny_config, write_config
from zsharp.pipeline.grid.expand import load_grid
from zsharp.pipeline.grid.schema import GridError


def _set(path: str, value: Any) -> dict[str, Any]:
    config = tiny_config()
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return config


def _without(key: str) -> dict[str, Any]:
    config = tiny_config()
    del config[key]
    return config


CATALOGUE: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level key", {**tiny_config(), "epochs": 3}, "epochs: unknown key"),
    ("no seeds", _without("seeds"), "seeds: required"),
    ("negative seed", _set("seeds", [0, -1]), "seeds.1"),
    ("duplicate seeds", _set("seeds", [1, 1]), "seeds"),
    ("unknown dataset", _set("datasets", {"cifar11": {}}), "datasets: 'cifar11'"),
    ("unknown model", _set("models", {"resnet21": {}}), "models: 'resnet21'"),
    (
        "unknown optimizer method",
        _set("optimizers.sam.optimizer", "samm"),
        "optimizers.sam.optimizer",
    ),
    (
        "unknown optimizer label as method",
        _set("optimizers", {"lion": {}}),
        "optimizers.lion.optimizer",
    ),
    ("negative rho", _set("optimizers.sam.opt_args.rho", -0.1), "optimizers.sam.opt_args.rho"),
    (
        "percentile 100",
        _set("optimizers.zsharp.opt_args.percentile", 100),
        "optimizers.zsharp.opt_args.percentile",
    ),
    (
        "bad variant",
        _set("optimizers.zsharp.opt_args.variant", "released"),
        "optimizers.zsharp.opt_args.variant",
    ),
    ("opt_args typo", _set("optimizers.sam.opt_args.rhoo", 0.05), "optimizers.sam.opt_args"),
    ("sigma for plain SAM", _set("optimizers.sam.opt_args.sigma", 1.0), "optimizers.sam.opt_args"),
    ("epochs zero", _set("train.epochs", 0), "train.epochs"),
    ("epochs as text", _set("train.epochs", "ten"), "train.epochs"),
    ("negative lr", _set("optimizers.sgd.lr", -1), "optimizers.sgd.lr"),
    ("setting typo", _set("train.batchsize", 64), "train.batchsize: unknown key"),
    ("unknown schedule", _set("train.schedule", "linear"), "train.schedule"),
    ("label smoothing 1", _set("train.label_smoothing", 1.0), "train.label_smoothing"),
    (
        "model option typo",
        _set("models.resnet20", {"model_args": {"shortcutt": "B"}}),
        "models.resnet20.model_args",
    ),
    (
        "bad ViT patch",
        {**_set("models", {"vit": {"model_args": {"patch_size": 3}}})},
        "models.vit.model_args",
    ),
    ("bad base", _set("optimizers.sam.base", "rmsprop"), "optimizers.sam.base"),
    ("bad wandb mode", _set("wandb.mode", "cloud"), "wandb.mode"),
    ("bad device", _set("runtime.device", "tpu"), "runtime.device"),
    ("override without set", _set("overrides", [{"when": {"dataset": "digits"}}]), "overrides.0"),
    ("compare with a missing entry", _set("compare", {"baseline": "asam"}), "compare.baseline"),
    ("bad experiment name", _set("experiment", "../escape"), "experiment"),
    ("resource typo", _set("resources.train", {"gpus": 1}), "resources.train.gpus"),
    (
        "override for a missing entry",
        _set("overrides", [{"when": {"optimizer": "adam"}, "set": {"lr": 0.1}}]),
        "overrides.0.when.optimizer",
    ),
    ("infinite lr", _set("train.lr", float("inf")), "train.lr"),
    ("NaN label smoothing", _set("train.label_smoothing", float("nan")), "train.label_smoothing"),
    ("NaN percentile", _set("optimizers.zsharp.opt_args.percentile", float("nan")),
     "optimizers.zsharp.opt_args.percentile"),
    ("seed beyond numpy's range", _set("seeds", [2**32]), "seeds.0"),
    ("float seed", _set("seeds", [0.0]), "seeds.0"),
    ("lr as words", _set("train.lr", "fast"), "train.lr"),
    ("ViT option on a ResNet", _set("models.resnet20", {"model_args": {"patch_size": 4}}),
     "models.resnet20.model_args.patch_size"),
    ("dropout 1", _set("models", {"wrn28_10": {"model_args": {"dropout": 1.0}}}),
     "models.wrn28_10.model_args.dropout"),
    ("another base's argument", _set("optimizers.sgd.opt_args", {"betas": [0.9, 0.99]}),
     "optimizers.sgd.opt_args.betas"),
    ("empty grid", {}, "datasets: required"),
    ("results outside the working folder", _set("results_dir", "../../x"), "results_dir"),
    ("data root that is a file", _set("data_root", "pyproject.toml"), "data_root"),
    ("a source for the embedded dataset", _set("datasets.digits", {"source": "/tmp/x"}),
     "datasets.digits.source"),
    ("unknown timm model", _set("models", {"timm:no_such_model_xyz": {}}), "models"),
    ("experiment name too long for a folder", _set("experiment", "x" * 300), "experiment"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "config", "key"), CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_invalid_config_is_refused_naming_the_key(
    name: str, config: dict, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # relative roots are read from the working folder
    with pytest.raises(GridError) as error:
        load_grid(copy.deepcopy(config))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(key), message


@pytest.mark.parametrize("text", ["1e-3", "5E-4", "1.0e-3", "+2e-1"])
def test_numbers_in_scientific_notation_are_numbers(text: str) -> None:
    """YAML 1.1 reads `lr: 1e-3` as text; the grid reads it as the number it is."""
    grid = load_grid(
        _set("train.lr", text) | {"optimizers": {"zsharp": {"opt_args": {"rho": text}}}}
    )
    cell = grid.cells[0].config
    assert cell.lr == float(text) and cell.opt_args["rho"] == float(text)
    assert isinstance(cell.lr, float)


@pytest.mark.parametrize(
    ("config", "key"),
    [(_set("optimizers.zsharp.opt_args.percentile", 100), "optimizers.zsharp.opt_args.percentile"),
     ({}, "(top level)")],
    ids=["percentile 100", "a config file naming no grid"],
)  # fmt: skip
def test_snakemake_stops_on_an_invalid_config_before_any_job(
    config: dict, key: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path, copy.deepcopy(config))
    result = snakemake(tmp_path, "--cores", "1", config=path, check=False, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    lines = [line for line in output.splitlines() if "invalid config:" in line]
    assert len(lines) == 1, output
    assert f"invalid config: {key}" in lines[0], lines[0]
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    assert not (tmp_path / "data").exists()
