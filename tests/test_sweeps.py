"""Issue 13's aggregate: sensitivity plots of swept entries, published results beside ours,
and the Holm correction of the paired comparison; a digits sweep through real `snakemake`.

Every expected number here is computed again in the test from the inputs (the seeds' own
accuracies, the p-values), not read back from the code under test.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.workflow_helpers import REPO, mtimes, snakemake, tiny_config, write_config
from zsharp.pipeline.aggregate import aggregate
from zsharp.pipeline.aggregate.plots import log_axis, plot_sensitivity
from zsharp.pipeline.aggregate.stats import (
    holm,
    paired_comparison,
    published_std,
    sensitivity_frame,
)
from zsharp.pipeline.cli import main
from zsharp.pipeline.grid.expand import Sweep, load_grid
from zsharp.pipeline.grid.published import Reference
from zsharp.pipeline.grid.schema import GridError

MADE_UP = "MADE UP for this test: not a published number"


# --- Holm–Bonferroni -----------------------------------------------------------------------


def test_holm_matches_a_hand_computation() -> None:
    # m = 4 tested (NaN is no test). Sorted: 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 =
    # 0.02, 0.03, 0.06, 0.04 → running maximum 0.02, 0.03, 0.06, 0.06.
    adjusted = holm([0.01, 0.04, 0.03, 0.005, math.nan])
    np.testing.assert_allclose(adjusted[:4], [0.03, 0.06, 0.06, 0.02], rtol=0, atol=1e-15)
    assert math.isnan(adjusted[4])
    # capped at 1: 2 × 0.5 = 1.0, then max(1.0, 0.6) = 1.0
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    # ties keep their order and one p-value is just Bonferroni with m = 1
    np.testing.assert_allclose(holm([0.02, 0.02]), [0.04, 0.04])
    np.testing.assert_allclose(holm([0.3]), [0.3])
    assert holm([]).shape == (0,)


def test_paired_comparison_states_holm_over_every_candidate() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(4):
        base = 0.90 + 0.01 * rng.standard_normal()
        rows.append({"dataset": "d", "model": "m", "optimizer": "sam", "seed": seed,
                     "status": "ok", "final_test_acc": base})  # fmt: skip
        for k, label in enumerate(["zsharp-p50", "zsharp-p90", "zsharp-p99"]):
            noise = 0.004 * rng.standard_normal()
            rows.append({"dataset": "d", "model": "m", "optimizer": label, "seed": seed,
                         "status": "ok", "final_test_acc": base + 0.003 * k + noise})  # fmt: skip
    seeds = pd.DataFrame(rows)
    frame = paired_comparison(
        seeds, [(c, "sam") for c in ("zsharp-p50", "zsharp-p90", "zsharp-p99")]
    )
    p = frame["p_value"].to_numpy()
    # Holm by hand: order, multiply by m − rank, running maximum, cap at 1
    order = np.argsort(p)
    expected = np.empty(3)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * p[i]))
        expected[i] = running
    np.testing.assert_allclose(frame["p_holm"], expected)
    assert (frame["correction"] == "Holm–Bonferroni over 3 comparisons").all()


# --- published results ---------------------------------------------------------------------


def _published_config(*entries: dict[str, Any]) -> dict[str, Any]:
    config = tiny_config()
    config["optimizers"]["zsharp"] = {
        "opt_args": {"rho": 0.05},
        "sweep": {"percentile": [90, 95]},
    }
    config["published"] = list(entries)
    return config


GOOD = {"dataset": "digits", "model": "resnet20", "optimizer": "sam", "accuracy": 90.0,
        "source": MADE_UP}  # fmt: skip

BAD_PUBLISHED = [
    ("unknown dataset", {**GOOD, "dataset": "cifar10"}, "published.0.dataset: 'cifar10'"),
    ("unknown model", {**GOOD, "model": "resnet56"}, "published.0.model: 'resnet56'"),
    ("unknown entry", {**GOOD, "optimizer": "lion"}, "published.0.optimizer: 'lion'"),
    (
        "method of several entries",
        {**GOOD, "optimizer": "zsharp"},
        "published.0.optimizer: 'zsharp' is the method of several entries",
    ),
    ("accuracy and error", {**GOOD, "error": 10.0}, "published.0.accuracy: give the accuracy"),
    (
        "neither accuracy nor error",
        {k: v for k, v in GOOD.items() if k != "accuracy"},
        "published.0.accuracy: give the accuracy",
    ),
    ("std and ci95", {**GOOD, "std": 0.1, "ci95": 0.1, "runs": 5}, "published.0.ci95"),
    ("ci95 without runs", {**GOOD, "ci95": 0.1}, "published.0.runs: required with ci95"),
    (
        "no source",
        {k: v for k, v in GOOD.items() if k != "source"},
        "published.0.source: required",
    ),
    ("accuracy over 100", {**GOOD, "accuracy": 101}, "published.0.accuracy"),
    ("negative std", {**GOOD, "std": -1}, "published.0.std"),
    ("typo", {**GOOD, "acc": 90}, "published.0.acc: unknown key"),
    ("one run", {**GOOD, "ci95": 0.1, "runs": 1}, "published.0.runs"),
]


@pytest.mark.parametrize(
    ("entry", "expected"), [c[1:] for c in BAD_PUBLISHED], ids=[c[0] for c in BAD_PUBLISHED]
)
def test_bad_published_entry_is_one_line_naming_the_key(
    entry: dict[str, Any], expected: str
) -> None:
    with pytest.raises(GridError) as raised:
        load_grid(_published_config(entry), cells=False)
    message = str(raised.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_published_entry_names_a_label_or_the_only_entry_of_a_method() -> None:
    by_error = {k: v for k, v in GOOD.items() if k != "accuracy"}
    grid = load_grid(
        _published_config(
            {**by_error, "optimizer": "zsharp-p95", "error": 5.5},
            {**GOOD, "optimizer": "sgd", "std": 0.5, "note": "a note"},
        ),
        cells=False,
    )
    first, second = grid.published
    assert (first.label, first.accuracy, first.std) == ("zsharp-p95", 94.5, None)
    assert (second.label, second.std, second.note) == ("sgd", 0.5, "a note")


def test_a_95_percent_interval_over_n_runs_becomes_a_std() -> None:
    # Student's t(0.975, 4) = 2.776445105 (tables): std = h·√n / t
    reference = Reference(0, "d", "m", "sam", 97.3, None, 0.1, 5, MADE_UP)
    assert published_std(reference) == pytest.approx(0.1 * math.sqrt(5) / 2.776445105, rel=1e-8)
    assert published_std(Reference(0, "d", "m", "sam", 97.3, 0.4, None, None, MADE_UP)) == 0.4
    assert math.isnan(published_std(Reference(0, "d", "m", "sam", 97.3, None, None, None, "x")))


def test_sgd_config_published_entries_are_cells_of_its_grid() -> None:
    grid = load_grid(yaml.safe_load((REPO / "config/sgd.yaml").read_text()))
    cells = {(c.dataset, c.model, c.label) for c in grid.cells}
    assert len(grid.published) >= 4
    for reference in grid.published:
        assert (reference.dataset, reference.model, reference.label) in cells
        assert "2010.01412" in reference.source and 0 < reference.accuracy < 100
    # Foret et al. 2021, Table 1 (error %): WRN-28-10 basic, SGD 3.5 / SAM 2.7 on CIFAR-10
    values = {(r.dataset, r.label): r.accuracy for r in grid.published}
    assert values[("cifar10", "sgd")] == pytest.approx(96.5)
    assert values[("cifar10", "sam")] == pytest.approx(97.3)


def test_sgd_config_dry_run_hands_its_published_results_to_the_aggregate(
    tmp_path: Path,
) -> None:
    result = snakemake(tmp_path, "-n", "-p", config=REPO / "config/sgd.yaml", timeout=300)
    output = result.stdout + result.stderr
    commands = [line for line in output.splitlines() if "zsharp aggregate" in line]
    assert len(commands) == 1, output[-2000:]
    document = commands[0].split("--grid ", 1)[1].split(" --experiment", 1)[0]
    grid = json.loads(document.strip("'"))
    sources = [entry["source"] for entry in grid["published"]]
    assert len(sources) >= 4 and all("2010.01412" in s for s in sources)


# --- the aggregate on hand-made cells ------------------------------------------------------


def _cell(root: Path, label: str, method: str, seed: int, acc: float) -> Path:
    cell = root / "cells" / "digits" / "resnet20" / label / f"seed{seed}"
    cell.mkdir(parents=True)
    config = {"dataset": "digits", "model": "resnet20", "optimizer": method, "seed": seed}
    summary = {
        "status": "ok", "label": label, "config": config, "train_seconds": 1.0,
        "final": {"epoch": 1, "test_acc": acc, "test_loss": 1.0, "train_loss": 1.0},
        "best": {"test_acc": acc, "epoch": 1},
    }  # fmt: skip
    (cell / "summary.json").write_text(json.dumps(summary))
    return cell


def test_aggregate_writes_sensitivity_published_and_holm(tmp_path: Path) -> None:
    config = _published_config(
        {**GOOD, "optimizer": "sam", "accuracy": 80.0, "std": 2.0},
        {**GOOD, "optimizer": "zsharp-p95", "accuracy": 50.0},
    )
    config["compare"] = {"baseline": "sam", "candidates": ["zsharp"]}  # the whole sweep
    grid = load_grid(config, cells=False)
    accuracy = {"sam": (0.81, 0.79, 0.80), "zsharp-p90": (0.82, 0.80, 0.83),
                "zsharp-p95": (0.84, 0.83, 0.86), "sgd": (0.7, 0.71, 0.69)}  # fmt: skip
    methods = {"sam": "sam", "sgd": "sgd", "zsharp-p90": "zsharp", "zsharp-p95": "zsharp"}
    cells = [
        _cell(tmp_path, label, methods[label], seed, acc)
        for label, values in accuracy.items()
        for seed, acc in enumerate(values)
    ]
    frames = aggregate(cells, tmp_path / "out", grid=grid)
    comparison = pd.read_csv(tmp_path / "out/comparison.csv")
    assert list(comparison["candidate"]) == ["zsharp-p90", "zsharp-p95"]
    assert comparison["p_holm"].notna().all()
    markdown = (tmp_path / "out/results.md").read_text()
    assert "Holm–Bonferroni over the 2 tested comparisons" in markdown
    assert "Against published results" in markdown and MADE_UP in markdown

    published = pd.read_csv(tmp_path / "out/published.csv")
    for row, pub, pub_std in zip(published.itertuples(), (80.0, 50.0), (2.0, 0.0), strict=True):
        ours = np.array(accuracy[row.optimizer]) * 100
        diff = ours.mean() - pub
        tolerance = 2 * math.sqrt(ours.std(ddof=1) ** 2 + pub_std**2)
        assert row.ours_pct == pytest.approx(ours.mean())
        assert row.diff_pp == pytest.approx(diff)
        assert row.within_spread == (abs(diff) <= tolerance)
    assert list(published["within_spread"]) == [True, False]

    sensitivity = pd.read_csv(tmp_path / "out/sensitivity.csv")
    assert list(sensitivity["value"]) == [90, 95]
    assert (sensitivity["baseline"] == "sam").all()
    assert sensitivity["baseline_mean"].iloc[0] == pytest.approx(np.mean(accuracy["sam"]))
    (path, drawn), *_ = frames["sensitivity_plots"].items()
    assert path.name == "sensitivity_zsharp_percentile_digits.png"
    assert list(drawn["x"]) == [90.0, 95.0]
    np.testing.assert_allclose(
        drawn["y"], [np.mean(accuracy[k]) * 100 for k in ("zsharp-p90", "zsharp-p95")]
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_sensitivity_plot_one_point_per_value_per_model_log_axis(tmp_path: Path) -> None:
    sweeps = {f"z-rho{r:g}": Sweep("z", {"rho": r}) for r in (0.01, 0.05, 0.2)}
    rows = []
    for model, level in (("resnet20", 0.9), ("resnet56", 0.92)):
        rows.append({"dataset": "d", "model": model, "optimizer": "sam", "seeds": 2,
                     "failed": 0, "missing": 0, "final_test_acc_mean": level,
                     "final_test_acc_std": 0.01})  # fmt: skip
        for i, label in enumerate(sweeps):
            rows.append({"dataset": "d", "model": model, "optimizer": label, "seeds": 2,
                         "failed": 0, "missing": 0, "final_test_acc_mean": level + 0.01 * i,
                         "final_test_acc_std": 0.005})  # fmt: skip
    frame = sensitivity_frame(pd.DataFrame(rows), sweeps, "sam")
    drawn = plot_sensitivity(frame, "z", "rho", "d", tmp_path / "s.png")
    assert len(drawn) == 6
    for model in ("resnet20", "resnet56"):
        assert list(drawn[drawn["model"] == model]["x"]) == [0.01, 0.05, 0.2]
    assert log_axis([0.01, 0.05, 0.2]) and not log_axis([0, 50, 99.9])
    assert not log_axis([90, 95, 99]) and not log_axis(["paper", "official"])
    with Image.open(tmp_path / "s.png") as image:
        assert image.format == "PNG"


def test_aggregate_command_refuses_a_bad_grid_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = _cell(tmp_path, "sam", "sam", 0, 0.5)
    bad = _published_config({**GOOD, "model": "vgg16_bn"})
    status = main(["aggregate", str(cell), "--out", str(tmp_path / "out"),
                   "--grid", json.dumps(bad), "--wandb-mode", "disabled"])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert error == (
        "zsharp aggregate: error: --grid: published.0.model: 'vgg16_bn' is not one of the "
        "grid's models ['resnet20']"
    )


def test_ablation_configs_validate() -> None:
    for name, cells, families in (
        ("ablation.yaml", 90, {"zsharp": 7, "zsharp95": 5}),
        ("ablation-digits.yaml", 20, {"zsharp": 4, "zsharp95": 3}),
    ):
        grid = load_grid(yaml.safe_load((REPO / "config" / name).read_text()))
        assert len(grid.cells) == cells, name
        counted: dict[str, int] = {}
        for sweep in grid.sweeps.values():
            counted[sweep.family] = counted.get(sweep.family, 0) + 1
        assert counted == families, name


# --- a digits sweep through the real snakemake ---------------------------------------------


def _sweep_config(percentiles: list[float]) -> dict[str, Any]:
    config = tiny_config(experiment="sweep", seeds=[0, 1])
    config["optimizers"] = {
        "zsharp": {"opt_args": {"rho": 0.05}, "sweep": {"percentile": percentiles}}
    }
    config["evaluate"] = {"hessian_samples": 32, "hessian_iterations": 1}
    config["published"] = [
        {"dataset": "digits", "model": "resnet20", "optimizer": "zsharp-p95",
         "accuracy": 50.0, "std": 5.0, "source": MADE_UP},
    ]  # fmt: skip
    return config


@pytest.mark.slow
def test_digits_sweep_through_snakemake(tmp_path: Path) -> None:
    """One cell per value and seed; adding a value trains only its cells; the sensitivity
    PNG has one point per value; the made-up published value beside ours."""
    exp = tmp_path / "results/sweep"
    snakemake(tmp_path, "--cores", "2", config=write_config(tmp_path, _sweep_config([50, 95])))
    cells = sorted(
        str(p.parent.relative_to(exp / "cells")) for p in exp.glob("cells/**/summary.json")
    )
    assert cells == [f"digits/resnet20/zsharp-p{p}/seed{s}" for p in (50, 95) for s in (0, 1)]

    seeds = pd.read_csv(exp / "seeds.csv")
    ours = seeds[seeds["optimizer"] == "zsharp-p95"]["final_test_acc"].to_numpy() * 100
    published = pd.read_csv(exp / "published.csv")
    row = published.iloc[0]
    assert row["source"] == MADE_UP and row["published_pct"] == 50.0
    assert row["diff_pp"] == pytest.approx(ours.mean() - 50.0)
    tolerance = 2 * math.sqrt(ours.std(ddof=1) ** 2 + 5.0**2)
    assert bool(row["within_spread"]) == (abs(ours.mean() - 50.0) <= tolerance)

    before = mtimes(exp)
    config = write_config(tmp_path, _sweep_config([50, 95, 99]))
    dry = snakemake(tmp_path, "-n", "--quiet", "rules", config=config)
    jobs = dict(line.split()[:2] for line in dry.stdout.splitlines() if len(line.split()) >= 2)
    assert (jobs.get("train"), jobs.get("evaluate"), jobs.get("aggregate")) == ("2", "2", "1")
    snakemake(tmp_path, "--cores", "2", config=config)
    after = mtimes(exp)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {
        f"cells/digits/resnet20/zsharp-p99/seed{s}/summary.json" for s in (0, 1)
    }

    plot = exp / "plots/sensitivity_zsharp_percentile_digits.png"
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 300
    sensitivity = pd.read_csv(exp / "sensitivity.csv")
    assert sorted(sensitivity["value"]) == [50, 95, 99]
    # the plotted points, drawn again from the workflow's cells: one per value
    grid = load_grid(copy.deepcopy(_sweep_config([50, 95, 99])), cells=False)
    frames = aggregate(sorted(exp.glob("cells/*/*/*/seed*")), tmp_path / "again", grid=grid)
    drawn = next(iter(frames["sensitivity_plots"].values()))
    assert list(drawn["x"]) == [50.0, 95.0, 99.0]


def test_aggregate_command_by_hand_reads_a_config_file(tmp_path: Path) -> None:
    """`zsharp aggregate CELL... --out DIR --grid config.yaml`, as the README shows it."""
    cells = [_cell(tmp_path, "sam", "sam", s, 0.8 + 0.01 * s) for s in (0, 1)]
    config = write_config(tmp_path, _published_config({**GOOD, "accuracy": 80.0}))
    arguments = [*map(str, cells), "--out", str(tmp_path / "out"), "--grid", str(config)]
    assert main(["aggregate", *arguments, "--wandb-mode", "disabled"]) == 0
    published = pd.read_csv(tmp_path / "out/published.csv")
    assert published["ours_pct"].iloc[0] == pytest.approx(80.5)
