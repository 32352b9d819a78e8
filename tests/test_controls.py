"""Controls that make the comparison answer its question: matched-perturbation baselines,
label noise, and effects with their uncertainty.

* A matched control (``match:``) is SAM whose ρ makes its ‖ε‖ equal another entry's for
  each model: checked against a count of the model's tensors written here, and against the
  ‖ε‖ the real training measures for both entries.
* Label noise is a cell setting: exactly r·N symmetric flips (or the class map), drawn per
  (dataset, seed) apart from training's generators, test labels clean, recorded by digest.
* The comparison gives each paired difference with its 95 % t-interval, names the matched
  baseline, and the aggregate plots accuracy against ‖ε‖.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from tests.workflow_helpers import snakemake, tiny_config, write_config
from zsharp.data.noise import labels_digest, noisy_labels
from zsharp.models import build_model
from zsharp.pipeline.aggregate.stats import paired_comparison
from zsharp.pipeline.cell.config import ConfigError, Runtime, cell_config
from zsharp.pipeline.cell.trainer import CellTrainer
from zsharp.pipeline.grid.expand import comparison_pairs, load_grid
from zsharp.pipeline.grid.schema import GridError

# --- matched controls ------------------------------------------------------------------------


def official_grid(**changes) -> dict:
    config = tiny_config(
        models={"resnet20": {}, "vgg16_bn": {"model_args": {"final_pool": "avg"}}},
        optimizers={
            "sam": {"opt_args": {"rho": 0.05}},
            "zsharp-official": {"optimizer": "zsharp",
                                "opt_args": {"rho": 0.05, "variant": "official"}},
            "sam-matched": {"optimizer": "sam", "match": "zsharp-official"},
            "zsharp": {"opt_args": {"rho": 0.07}},
            "fsam-matched": {"optimizer": "fsam", "match": "zsharp"},
        },
    )  # fmt: skip
    config.update(changes)
    return config


@pytest.mark.parametrize("model", ["resnet20", "vgg16_bn"])
def test_a_matched_rho_is_the_released_zsharps_norm(model: str) -> None:
    """ρ·√n with n the model's tensors of ndim > 1 (counted here on the real model); the
    paper's ZSharp keeps ‖ε‖ = ρ, so its matched control keeps its ρ."""
    grid = load_grid(official_grid())
    options = {"final_pool": "avg"} if model == "vgg16_bn" else {}
    net = build_model(model, 10, 8, 1, **options)
    n = sum(1 for p in net.parameters() if p.dim() > 1)
    cell = grid.cell("digits", model, "sam-matched", 0)
    assert cell.config.opt_args["rho"] == pytest.approx(0.05 * math.sqrt(n), rel=1e-12)
    assert cell.matched["entry"] == "zsharp-official" and f"√{n}" in cell.matched["target_rule"]
    paper = grid.cell("digits", model, "fsam-matched", 0)
    assert paper.config.opt_args["rho"] == pytest.approx(0.07, rel=1e-12)
    assert grid.matches == {"sam-matched": "zsharp-official", "fsam-matched": "zsharp"}


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"optimizer": "sam", "match": "nobody"}, "is not an optimizers entry"),
        ({"optimizer": "sam", "match": "control"}, "cannot match itself"),
        ({"optimizer": "sam", "match": "asam"}, "depends on the weights"),
        ({"optimizer": "sam", "match": "zsharp", "opt_args": {"rho": 0.1}}, "match sets ρ"),
        ({"optimizer": "asam", "match": "zsharp"}, "depends on the weights"),
    ],
)
def test_a_bad_match_is_one_line_naming_the_key(entry: dict, match: str) -> None:
    config = tiny_config(optimizers={"zsharp": {}, "asam": {}, "control": entry})
    with pytest.raises(GridError, match=rf"^optimizers\.control\.(match|opt_args\.rho): .*{match}"):
        load_grid(config)


@pytest.mark.slow  # a workflow run of its own (> 10 s)
def test_matched_cells_measure_the_same_norm_through_the_workflow(tmp_path: Path) -> None:
    """The real cells of the released ZSharp and of its matched SAM: their measured mean ‖ε‖
    agree to the rule's bound (the 1-D tensors' SAM share adds at most ρ² to ‖ε‖²); the
    summary says what was matched; the table and the comparison show it."""
    config = tiny_config(
        optimizers={
            "sam": {"opt_args": {"rho": 0.05}},
            "zsharp-official": {"optimizer": "zsharp",
                                "opt_args": {"rho": 0.05, "variant": "official"}},
            "sam-matched": {"optimizer": "sam", "match": "zsharp-official"},
        },
        seeds=[0, 1],
        compare={"baseline": "sam", "candidates": ["zsharp-official"]},
    )  # fmt: skip
    snakemake(tmp_path, "--cores", "2", config=write_config(tmp_path, config))
    exp = tmp_path / "results/tiny"
    cell = exp / "cells/digits/resnet20/sam-matched/seed0"
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["matched"]["entry"] == "zsharp-official"
    rho = summary["config"]["opt_args"]["rho"]
    assert summary["matched"]["rho"] == rho == pytest.approx(0.05 * math.sqrt(20))
    table = pd.read_csv(exp / "results.csv").set_index("optimizer")
    official, matched = (
        table.loc[k, "epsilon_norm_mean"] for k in ("zsharp-official", "sam-matched")
    )
    assert table.loc["sam", "epsilon_norm_mean"] == pytest.approx(0.05, rel=1e-4)
    assert matched == pytest.approx(rho, rel=1e-4)  # SAM's ‖ε‖ is its ρ
    assert rho <= official <= 0.05 * math.sqrt(21)  # the released rule, its 1-D share
    comparison = pd.read_csv(exp / "comparison.csv")
    rows = set(
        zip(
            comparison["candidate"],
            comparison["baseline"],
            comparison["control"].fillna(""),
            strict=True,
        )
    )
    assert rows == {
        ("zsharp-official", "sam", ""),
        ("zsharp-official", "sam-matched", "matched ‖ε‖"),
    }
    assert "(matched ‖ε‖)" in (exp / "results.md").read_text()
    assert (exp / "plots/accuracy_vs_epsilon_digits_resnet20.png").stat().st_size > 10_000


# --- effects with uncertainty ------------------------------------------------------------------


def test_the_paired_difference_has_its_t_interval() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(0.9, 0.01, 5)
    cand = base + rng.normal(0.004, 0.003, 5)
    seeds = pd.DataFrame(
        [{"dataset": "d", "model": "m", "optimizer": name, "seed": i, "status": "ok",
          "final_test_acc": v} for name, values in (("b", base), ("c", cand))
         for i, v in enumerate(values)]
    )  # fmt: skip
    row = paired_comparison(seeds, [("c", "b")]).iloc[0]
    diff = cand - base
    half = stats.t.ppf(0.975, 4) * diff.std(ddof=1) / math.sqrt(5)
    assert row["ci95_low"] == pytest.approx(diff.mean() - half)
    assert row["ci95_high"] == pytest.approx(diff.mean() + half)
    assert row["p_value"] == pytest.approx(stats.ttest_rel(cand, base).pvalue)


def test_a_swept_baseline_pairs_each_value_with_its_own() -> None:
    config = tiny_config(
        optimizers={
            "sgd": {"sweep": {"label_noise": [0.2, 0.4]}},
            "sam": {"sweep": {"label_noise": [0.2, 0.4]}},
        },
        compare={"baseline": "sgd", "candidates": ["sam"]},
    )
    assert comparison_pairs(load_grid(config)) == [
        ("sam-noise0.2", "sgd-noise0.2"),
        ("sam-noise0.4", "sgd-noise0.4"),
    ]


# --- label noise ---------------------------------------------------------------------------------


def test_symmetric_noise_flips_exactly_r_n_labels_to_other_classes() -> None:
    labels = np.arange(1000) % 10
    noisy = noisy_labels(labels, 10, 0.4, "symmetric", dataset="cifar10", seed=7)
    wrong = noisy != labels
    assert wrong.sum() == 400
    # the new class is uniform among the other nine: a χ² test of the shift (noisy − y) mod C
    shifts = np.bincount((noisy[wrong] - labels[wrong]) % 10, minlength=10)
    assert shifts[0] == 0
    assert stats.chisquare(shifts[1:]).pvalue > 1e-3
    again = noisy_labels(labels, 10, 0.4, "symmetric", dataset="cifar10", seed=7)
    torch.manual_seed(123)  # training's generators have no say in it
    np.random.seed(123)
    assert np.array_equal(
        noisy, noisy_labels(labels, 10, 0.4, "symmetric", dataset="cifar10", seed=7)
    )
    assert np.array_equal(noisy, again)
    other = noisy_labels(labels, 10, 0.4, "symmetric", dataset="cifar10", seed=8)
    assert not np.array_equal(noisy, other) and (other != labels).sum() == 400
    assert not np.array_equal(
        noisy, noisy_labels(labels, 10, 0.4, "symmetric", dataset="svhn", seed=7)
    )


def test_asymmetric_noise_follows_the_class_map() -> None:
    """Patrini et al. 2017's CIFAR-10 map: truck → automobile, bird → airplane, deer →
    horse, cat ↔ dog, each with probability r; every other class untouched."""
    labels = np.repeat(np.arange(10), 2000)
    noisy = noisy_labels(labels, 10, 0.3, "asymmetric", dataset="cifar10", seed=0,
                         noise_map=((9, 1), (2, 0), (4, 7), (3, 5), (5, 3)))  # fmt: skip
    moved = {(int(a), int(b)) for a, b in zip(labels, noisy, strict=True) if a != b}
    assert moved == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}
    for source in (9, 2, 4, 3, 5):
        share = float((noisy[labels == source] != source).mean())
        assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000)


def test_a_cell_trains_on_its_noisy_labels_and_records_them(
    data_root: Path, tmp_path: Path
) -> None:
    def trainer(optimizer: str, seed: int, **noise) -> CellTrainer:
        cfg = cell_config("digits", "resnet20", optimizer, epochs=1, seed=seed, **noise)
        return CellTrainer(cfg, Runtime(out=tmp_path, data_root=data_root, threads=1))

    clean = trainer("sgd", 0)
    sgd, sam = trainer("sgd", 0, label_noise=0.3), trainer("sam", 0, label_noise=0.3)
    other_seed = trainer("sgd", 1, label_noise=0.3)
    assert clean.label_noise is None
    y, noisy = clean.data.train_y.numpy(), sgd.data.train_y.numpy()
    assert sgd.label_noise == {
        "rate": 0.3, "kind": "symmetric", "wrong": round(0.3 * len(y)),
        "labels_sha256": labels_digest(noisy),
    }  # fmt: skip
    assert int((noisy != y).sum()) == round(0.3 * len(y))
    assert torch.equal(sgd.data.test_y, clean.data.test_y)  # the test set stays clean
    assert sam.label_noise == sgd.label_noise  # one label set per (dataset, seed)
    assert other_seed.label_noise["labels_sha256"] != sgd.label_noise["labels_sha256"]
    assert sgd.cfg.digest() != clean.cfg.digest()


def test_asymmetric_noise_without_a_class_map_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"^label_noise_kind: asymmetric noise has no class map for digits"
    ):
        cell_config("digits", "resnet20", "sgd", label_noise=0.2, label_noise_kind="asymmetric")


@pytest.mark.slow  # a workflow run of its own (> 10 s)
def test_a_label_noise_cell_trains_through_the_workflow(tmp_path: Path) -> None:
    config = tiny_config(optimizers={"sgd": {"sweep": {"label_noise": [0.3]}}})
    snakemake(tmp_path, "--cores", "2", config=write_config(tmp_path, config))
    cell = tmp_path / "results/tiny/cells/digits/resnet20/sgd-noise0.3/seed0"
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["label_noise"]["rate"] == 0.3
    assert summary["config"]["label_noise"] == 0.3
    assert copy.deepcopy(summary["label_noise"]["wrong"]) > 0
