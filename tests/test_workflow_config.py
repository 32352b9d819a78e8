"""A catalogue of invalid workflow configs: each fails before any job, naming the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.workflow_helpers import snakemake, tiny_config, write_config


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
]


@pytest.mark.parametrize(("name", "config", "key"), CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_invalid_config_fails_before_any_job(
    name: str, config: dict, key: str, tmp_path: Path
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
