"""Aggregate finished cells into a table, a paired comparison, plots and a W&B run.

Per cell (dataset × model × optimizer entry) the mean ± std over seeds of the final and
best test accuracy, test loss, ECE, sharpness, final train loss and training time. A seed
whose training failed for good (a divergence, a configuration that cannot run) is counted
and shown as FAILED; one with no result (a transient fault on its last attempt, which the
next run retries; a summary that is absent or unreadable) as MISSING, with the reason and a
warning naming the file, instead of breaking the table. The
paired comparison takes each candidate (e.g. ZSharp, or every value of a swept ZSharp entry)
minus the baseline (SAM) seed by seed and reports the mean difference, its std, the wins, a
paired t-test's p-value and that p-value adjusted by Holm–Bonferroni over every comparison
of the table (:func:`holm`).

Given the grid (:func:`zsharp.grid.load_grid`), also the sensitivity of each swept entry
(final test accuracy against the swept value, :func:`sensitivity_frame`) and the grid's
``published`` results beside ours (:func:`published_table`).

Outputs in ``out``: ``results.csv`` (one row per cell), ``seeds.csv`` (one row per seed),
``comparison.csv``, ``published.csv``, ``sensitivity.csv``, ``results.md`` (the tables,
readable) and ``plots/``: ``curves_<dataset>_<model>.png`` (test accuracy per epoch, mean and
std band over seeds, one line per optimizer), ``final_accuracy.png``,
``accuracy_vs_sharpness.png`` and ``sensitivity_<family>_<key>_<dataset>.png``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from scipy import stats

from zsharp.atomic import DirectoryLock, atomic_open, remove_stale_temps
from zsharp.config import ConfigError
from zsharp.grid import (
    SENSITIVITY_PLOT,
    Grid,
    Reference,
    Sweep,
    comparison,
    grid_comparison,
    sensitivity_plots,
)

METRICS = (
    "final_test_acc",
    "best_test_acc",
    "test_loss",
    "ece",
    "sharpness",
    "final_train_loss",
    "train_seconds",
)
CELL = ["dataset", "model", "optimizer"]
CORRECTION = "Holm–Bonferroni"
# the within-spread test of a published result: |ours − published| ≤ SPREAD_Z · √(s² + s_pub²)
SPREAD_Z = 2.0


# a cell's path in the workflow's layout: .../cells/<dataset>/<model>/<entry>/seed<k>
_LAYOUT = re.compile(r"seed(\d+)")


class AggregateError(ConfigError):
    """Nothing to aggregate: bad input (the command line exits 2); the message names the
    file."""


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(the document, None), (None, None) if there is no file, or (None, why not)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{path}: cannot be read: {error}"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        return None, f"{path}: not valid JSON ({error})"


def cell_identity(cell: Path, summary: dict[str, Any]) -> tuple[str, str, str, int]:
    """(dataset, model, optimizer entry, seed) of a cell, as its summary records them: the
    entry is the grid's label (two entries may share one optimizer), else the optimizer."""
    config = summary.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{cell / 'summary.json'}: records no configuration")
    try:
        label = summary.get("label") or config["optimizer"]
        return str(config["dataset"]), str(config["model"]), str(label), int(config["seed"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{cell / 'summary.json'}: its configuration lacks {error}") from None


def _identity_from_path(cell: Path) -> tuple[str, str, str, int] | None:
    """The identity the workflow's layout gives a cell without a readable summary."""
    parts = cell.absolute().parts
    match = _LAYOUT.fullmatch(parts[-1]) if len(parts) >= 4 else None
    if match is None:
        return None
    return parts[-4], parts[-3], parts[-2], int(match.group(1))


def _no_result(cell: Path, reason: str, warn: list[str]) -> dict[str, Any] | None:
    """The row of a seed with no usable result (warned about), if its identity is known."""
    identity = _identity_from_path(cell)
    if identity is None:
        warn.append(f"{reason}; {cell} is left out (not a <dataset>/<model>/<entry>/seed<k> path)")
        return None
    warn.append(f"{reason}; {cell} shows as MISSING")
    dataset, model, label, seed = identity
    return {
        "dataset": dataset, "model": model, "optimizer": label, "seed": seed,
        "method": label, "status": "missing", "error": reason,
    }  # fmt: skip


def _row(cell: Path, warn: list[str]) -> dict[str, Any] | None:
    """One seed's row: its status and, for a result, its metrics (None: unplaceable)."""
    summary, problem = _read_json(cell / "summary.json")
    if problem is None and summary is None:
        problem = f"{cell / 'summary.json'}: not found (the cell has not finished)"
    if problem is None and not isinstance(summary, dict):
        problem = f"{cell / 'summary.json'}: not a JSON object"
    if problem is not None:
        return _no_result(cell, problem, warn)
    try:
        dataset, model, label, seed = cell_identity(cell, summary)
    except ValueError as error:
        return _no_result(cell, str(error), warn)
    status = summary.get("status", "ok")
    error = str(summary.get("error", ""))
    if status == "failed" and summary.get("transient"):  # no result: the next run retries
        status = "missing"
    row: dict[str, Any] = {
        "dataset": dataset, "model": model, "optimizer": label, "seed": seed,
        "method": summary["config"].get("optimizer", label), "status": status, "error": error,
    }  # fmt: skip
    if status != "ok":
        return row
    evaluation, problem = _read_json(cell / "eval.json")
    if problem is not None or (evaluation is not None and not isinstance(evaluation, dict)):
        warn.append(f"{problem or cell / 'eval.json'}: ignored; no ECE or sharpness for this seed")
        evaluation = None
    evaluation = evaluation or {}
    try:
        final = summary["final"]
        row |= {
            "final_test_acc": float(final["test_acc"]),
            "best_test_acc": float(summary["best"]["test_acc"]),
            "test_loss": float(final["test_loss"]),
            "final_train_loss": float(final["train_loss"]),
            "train_seconds": float(summary["train_seconds"]),
            "ece": evaluation.get("ece", math.nan),
            "sharpness": evaluation.get("sharpness", math.nan),
        }
    except (KeyError, TypeError, ValueError) as error:
        reason = f"{cell / 'summary.json'}: a result without {error}"
        warn.append(f"{reason}; {cell} shows as MISSING")
        return {**{k: row[k] for k in (*CELL, "seed", "method")}, "status": "missing",
                "error": reason}  # fmt: skip
    return row


def _curve(cell: Path, row: dict[str, Any], warn: list[str]) -> list[dict[str, Any]]:
    """The per-epoch test accuracy of a seed with a result (none if unreadable, warned)."""
    points = []
    try:
        for line in (cell / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            points.append(
                {
                    **{k: row[k] for k in (*CELL, "seed")},
                    "epoch": int(record["epoch"]),
                    "test_acc": float(record["test_acc"]),
                }
            )
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as error:
        warn.append(f"{cell / 'metrics.jsonl'}: unreadable ({error}); no curve for this seed")
        return []
    return points


def seed_rows(cells: Sequence[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per cell directory (a seed) and the per-epoch curves of all of them. A cell
    without a usable summary is a MISSING seed, placed by its path in the workflow's
    layout (``<dataset>/<model>/<entry>/seed<k>``) and otherwise left out, with a warning
    either way; :class:`AggregateError` if no cell is left."""
    rows, curves, warn = [], [], []
    for cell in cells:
        cell = Path(cell)
        row = _row(cell, warn)
        if row is None:
            continue
        rows.append(row)
        if row["status"] == "ok":
            curves.extend(_curve(cell, row, warn))
    if not rows:
        first = warn[0].partition("; ")[0] if warn else "nothing readable"
        more = f" (and {len(cells) - 1} more)" if len(cells) > 1 else ""
        raise AggregateError(f"no cell to aggregate: {first}{more}")
    for message in warn:
        print(f"zsharp aggregate: warning: {message}", file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows)
    for metric in METRICS:
        if metric not in frame:
            frame[metric] = math.nan
    return frame, pd.DataFrame(curves, columns=[*CELL, "seed", "epoch", "test_acc"])


def cell_table(seeds: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over the successful seeds of every metric, per cell."""
    grouped = seeds.groupby(CELL, sort=False)
    table = grouped.agg(
        seeds=("seed", "size"),
        failed=("status", lambda s: int((s == "failed").sum())),
        missing=("status", lambda s: int((s == "missing").sum())),
    ).reset_index()
    ok = seeds[seeds["status"] == "ok"]
    stats_frame = ok.groupby(CELL, sort=False)[list(METRICS)].agg(["mean", "std"])
    stats_frame.columns = [f"{metric}_{stat}" for metric, stat in stats_frame.columns]
    return table.merge(stats_frame.reset_index(), on=CELL, how="left")


def paired_comparison(
    seeds: pd.DataFrame, baseline: str, candidates: Sequence[str], metric: str = "final_test_acc"
) -> pd.DataFrame:
    """Candidate minus baseline, paired by seed, per dataset and model."""
    ok = seeds[seeds["status"] == "ok"]
    rows = []
    for (dataset, model), group in ok.groupby(["dataset", "model"], sort=False):
        base = group[group["optimizer"] == baseline].set_index("seed")[metric]
        for candidate in candidates:
            cand = group[group["optimizer"] == candidate].set_index("seed")[metric]
            common = base.index.intersection(cand.index)
            if len(common) == 0:
                continue
            diff = (cand[common] - base[common]).to_numpy(dtype=float)
            p_value = math.nan
            if len(diff) >= 2 and np.std(diff) > 0:
                p_value = float(stats.ttest_rel(cand[common], base[common]).pvalue)
            rows.append({
                "dataset": dataset, "model": model, "candidate": candidate,
                "baseline": baseline, "metric": metric, "pairs": len(diff),
                "mean_diff": float(diff.mean()),
                "std_diff": float(diff.std(ddof=1)) if len(diff) > 1 else math.nan,
                "wins": int((diff > 0).sum()), "p_value": p_value,
            })  # fmt: skip
    frame = pd.DataFrame(
        rows,
        columns=[
            "dataset",
            "model",
            "candidate",
            "baseline",
            "metric",
            "pairs",
            "mean_diff",
            "std_diff",
            "wins",
            "p_value",
        ],
    )
    frame["p_holm"] = holm(frame["p_value"].to_numpy(dtype=float))
    tested = int(frame["p_value"].notna().sum())
    frame["correction"] = f"{CORRECTION} over {tested} comparisons" if tested else ""
    return frame


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (Holm 1979, step-down): with the m finite p-values
    sorted ascending, p_(i) becomes max over j ≤ i of min(1, (m − j + 1) · p_(j)); rejecting
    where the adjusted p ≤ α keeps the family-wise error rate at α. NaN (no test) stays NaN
    and does not count in m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m:
        order = tested[np.argsort(p[tested], kind="stable")]
        scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
        adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


# --- published results beside ours ---------------------------------------------------------


def published_std(reference: Reference) -> float:
    """The source's spread as a std over its runs, in percent: the std as given; from the
    half-width h of a 95 % confidence interval of a mean over n runs (Student's t),
    h · √n / t(0.975, n − 1); NaN when the source gives no spread."""
    if reference.std is not None:
        return reference.std
    if reference.ci95 is not None and reference.runs:
        n = reference.runs
        return reference.ci95 * math.sqrt(n) / float(stats.t.ppf(0.975, n - 1))
    return math.nan


def published_table(table: pd.DataFrame, references: Sequence[Reference]) -> pd.DataFrame:
    """Each published result beside ours, in percent: the difference ours − published and
    whether it lies within the seeds' spread, i.e. |diff| ≤ 2·√(s_ours² + s_pub²) with s the
    std over seeds (ours) and over the source's runs (:func:`published_std`; 0 when the source
    gives none): two runs' usual disagreement at about the 95 % level. Undecided (empty) with
    fewer than two of our seeds."""
    rows = []
    for ref in references:
        match = table[
            (table["dataset"] == ref.dataset)
            & (table["model"] == ref.model)
            & (table["optimizer"] == ref.label)
        ]
        ours, ours_std, ok = math.nan, math.nan, 0
        if len(match):
            row = match.iloc[0]
            ours, ours_std = row["final_test_acc_mean"] * 100, row["final_test_acc_std"] * 100
            ok = int(row["seeds"] - row["failed"] - row["missing"])
        pub_std = published_std(ref)
        diff = ours - ref.accuracy
        tolerance = SPREAD_Z * math.sqrt(ours_std**2 + (0.0 if math.isnan(pub_std) else pub_std**2))
        within = None if math.isnan(diff) or math.isnan(tolerance) else bool(abs(diff) <= tolerance)
        rows.append({
            "dataset": ref.dataset, "model": ref.model, "optimizer": ref.label,
            "seeds_ok": ok, "ours_pct": ours, "ours_std_pct": ours_std,
            "published_pct": ref.accuracy, "published_std_pct": pub_std,
            "published_spread": _spread_text(ref), "diff_pp": diff, "tolerance_pp": tolerance,
            "within_spread": within, "source": ref.source, "note": ref.note,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=PUBLISHED_COLUMNS)


PUBLISHED_COLUMNS = [
    "dataset", "model", "optimizer", "seeds_ok", "ours_pct", "ours_std_pct", "published_pct",
    "published_std_pct", "published_spread", "diff_pp", "tolerance_pp", "within_spread",
    "source", "note",
]  # fmt: skip


def _spread_text(ref: Reference) -> str:
    if ref.std is not None:
        return f"std {ref.std:g}"
    if ref.ci95 is not None:
        return f"95% CI ±{ref.ci95:g} over {ref.runs} runs"
    return "none given"


# --- sensitivity of swept entries ----------------------------------------------------------

SENSITIVITY_COLUMNS = [
    "family", "param", "value", "others", "dataset", "model", "optimizer", "seeds_ok",
    "final_test_acc_mean", "final_test_acc_std", "baseline", "baseline_mean", "baseline_std",
]  # fmt: skip


def sensitivity_frame(
    table: pd.DataFrame, sweeps: dict[str, Sweep], baseline: str | None
) -> pd.DataFrame:
    """One row per swept key of every cell of a swept entry: the value it takes, the other
    swept keys' values (``others``, for a product sweep), the final test accuracy (mean and
    std over its finished seeds) and the baseline entry's on the same dataset and model."""
    rows = []
    for _, cell in table.iterrows():
        sweep = sweeps.get(cell["optimizer"])
        if sweep is None:
            continue
        base = table[
            (table["dataset"] == cell["dataset"])
            & (table["model"] == cell["model"])
            & (table["optimizer"] == baseline)
        ]
        for key, value in sweep.values.items():
            others = ", ".join(f"{k}={v}" for k, v in sweep.values.items() if k != key)
            rows.append({
                "family": sweep.family, "param": key, "value": value, "others": others,
                "dataset": cell["dataset"], "model": cell["model"],
                "optimizer": cell["optimizer"],
                "seeds_ok": int(cell["seeds"] - cell["failed"] - cell["missing"]),
                "final_test_acc_mean": cell["final_test_acc_mean"],
                "final_test_acc_std": cell["final_test_acc_std"],
                "baseline": baseline if len(base) else None,
                "baseline_mean": base["final_test_acc_mean"].iloc[0] if len(base) else math.nan,
                "baseline_std": base["final_test_acc_std"].iloc[0] if len(base) else math.nan,
            })  # fmt: skip
    return pd.DataFrame(rows, columns=SENSITIVITY_COLUMNS)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def log_axis(values: Sequence[Any]) -> bool:
    """Whether swept values are drawn on a log axis: all numbers, all positive, and the
    largest at least 10 times the smallest (they span a decade or more)."""
    if not values or not all(_is_number(v) for v in values):
        return False
    return min(values) > 0 and max(values) >= 10 * min(values)


def plot_sensitivity(
    frame: pd.DataFrame, family: str, param: str, dataset: str, path: Path
) -> pd.DataFrame:
    """Final test accuracy (mean ± std over seeds) of a swept entry against one swept key on
    one dataset: a line per model (and per value of the other swept keys), the baseline's
    level as a dashed line in the model's colour (±1 std band); a log x-axis when the values
    are positive and span a factor of 10 or more. Returns the points drawn (``x``, ``y``,
    ``yerr`` in percent), one row per value and line."""
    part = frame[
        (frame["family"] == family) & (frame["param"] == param) & (frame["dataset"] == dataset)
    ]
    values = list(dict.fromkeys(part["value"]))
    numeric = all(_is_number(v) for v in values)
    position = {v: (float(v) if numeric else float(i)) for i, v in enumerate(values)}
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn, colors = [], {}
    for (model, others), group in part.groupby(["model", "others"], sort=False):
        group = group.assign(x=group["value"].map(position)).sort_values("x")
        color = colors.setdefault(model, f"C{len(colors) % 10}")
        y = group["final_test_acc_mean"] * 100
        yerr = group["final_test_acc_std"].fillna(0) * 100
        name = f"{model} ({others})" if others else model
        ax.errorbar(group["x"], y, yerr=yerr, marker="o", capsize=3, color=color, label=name)
        drawn.append(group.assign(y=y, yerr=yerr, line=name))
    for model, color in colors.items():
        base = part[(part["model"] == model) & part["baseline_mean"].notna()]
        if base.empty:
            continue
        level, spread = base["baseline_mean"].iloc[0] * 100, base["baseline_std"].iloc[0] * 100
        ax.axhline(level, color=color, linestyle="--", linewidth=1,
                   label=f"{model}: {base['baseline'].iloc[0]}")  # fmt: skip
        if not math.isnan(spread):
            ax.axhspan(level - spread, level + spread, color=color, alpha=0.08)
    if log_axis(values):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(list(position.values()), [str(v) for v in values])
    if part.empty:
        ax.text(0.5, 0.5, "no finished cells", transform=ax.transAxes, ha="center")
    else:
        ax.legend(fontsize="small")
    ax.set(xlabel=param, ylabel="final test accuracy (%)", title=f"{dataset}: {family} by {param}")
    ax.grid(alpha=0.3)
    _save(fig, path)
    columns = [*SENSITIVITY_COLUMNS, "x", "y", "yerr", "line"]
    return pd.concat(drawn, ignore_index=True) if drawn else pd.DataFrame(columns=columns)


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown(
    table: pd.DataFrame,
    comparison: pd.DataFrame,
    seeds: pd.DataFrame,
    published: pd.DataFrame | None = None,
) -> str:
    """The human-readable results: cells, published results beside ours, comparison,
    failures."""
    shown = pd.DataFrame({
        "dataset": table["dataset"], "model": table["model"], "optimizer": table["optimizer"],
        "seeds": [_seeds(s, f, m) for s, f, m in zip(table["seeds"], table["failed"],
                                                     table["missing"], strict=True)],
        "final acc %": [_pm(m, s, 100) for m, s in zip(table["final_test_acc_mean"],
                                                     table["final_test_acc_std"], strict=True)],
        "best acc %": [_pm(m, s, 100) for m, s in zip(table["best_test_acc_mean"],
                                                    table["best_test_acc_std"], strict=True)],
        "test loss": [_pm(m, s, 1, 3) for m, s in zip(table["test_loss_mean"],
                                                    table["test_loss_std"], strict=True)],
        "ECE %": [_pm(m, s, 100) for m, s in zip(table["ece_mean"], table["ece_std"],
                                                 strict=True)],
        "sharpness": [_pm(m, s, 1, 3) for m, s in zip(table["sharpness_mean"],
                                                    table["sharpness_std"], strict=True)],
        "train loss": [_pm(m, s, 1, 4) for m, s in zip(table["final_train_loss_mean"],
                                                     table["final_train_loss_std"], strict=True)],
        "time s": [_pm(m, s, 1, 0) for m, s in zip(table["train_seconds_mean"],
                                                 table["train_seconds_std"], strict=True)],
    })  # fmt: skip
    parts = [
        "# Results",
        "",
        "Mean ± std over seeds (final = last epoch).",
        "",
        shown.to_markdown(index=False),
        "",
    ]
    if published is not None and not published.empty:
        parts += [
            "## Against published results",
            "",
            "Final test accuracy in %; diff = ours − published; within spread: "
            f"|diff| ≤ {SPREAD_Z:g}·√(std_ours² + std_pub²) (std over our seeds and over the "
            "source's runs; a 95 % CI over n runs is turned into a std with Student's t; a "
            "source without a spread counts 0; – with fewer than two of our seeds).",
            "",
            _published_markdown(published),
            "",
        ]
    if not comparison.empty:
        comp = pd.DataFrame({
            "dataset": comparison["dataset"], "model": comparison["model"],
            "comparison": comparison["candidate"] + " − " + comparison["baseline"],
            "final acc diff (pp)": [_pm(m, s, 100) for m, s in
                                    zip(comparison["mean_diff"], comparison["std_diff"],
                                        strict=True)],
            "wins": [f"{w}/{n}" for w, n in zip(comparison["wins"], comparison["pairs"],
                                                strict=True)],
            "paired t-test p": [("–" if pd.isna(p) else f"{p:.3g}")
                                for p in comparison["p_value"]],
            "Holm p": [("–" if pd.isna(p) else f"{p:.3g}") for p in comparison["p_holm"]],
        })  # fmt: skip
        tested = int(comparison["p_value"].notna().sum())
        parts += [
            "## Paired comparison over seeds",
            "",
            "p: two-sided paired t-test over seeds; Holm p: adjusted for multiple comparisons "
            f"with {CORRECTION} over the {tested} tested comparisons of this table "
            "(family-wise error rate).",
            "",
            comp.to_markdown(index=False),
            "",
        ]
    for status, title in (
        ("failed", "## Failed cells"),
        ("missing", "## Missing cells (no result yet: running the workflow again retries them)"),
    ):
        listed = seeds[seeds["status"] == status]
        if listed.empty:
            continue
        parts += [title, ""]
        for _, row in listed.iterrows():
            parts.append(
                f"- {row['dataset']}/{row['model']}/{row['optimizer']}/seed"
                f"{row['seed']}: {status} {' '.join(str(row['error']).split())}".rstrip()
            )
        parts.append("")
    return "\n".join(parts)


def _published_markdown(frame: pd.DataFrame) -> str:
    def number(value: float, digits: int = 2, sign: str = "") -> str:
        return "–" if pd.isna(value) else f"{value:{sign}.{digits}f}"

    within = {True: "yes", False: "no"}
    shown = pd.DataFrame({
        "dataset": frame["dataset"], "model": frame["model"], "optimizer": frame["optimizer"],
        "ours %": [_pm(m, s) for m, s in zip(frame["ours_pct"], frame["ours_std_pct"],
                                            strict=True)],
        "published %": [f"{number(a)} ({s})" for a, s in zip(frame["published_pct"],
                                                          frame["published_spread"],
                                                          strict=True)],
        "diff pp": [number(d, sign="+") for d in frame["diff_pp"]],
        "within spread": [within.get(w, "–") if not pd.isna(w) else "–"
                          for w in frame["within_spread"]],
        "source": [" ".join(f"{s} {n}".split()) for s, n in zip(frame["source"],
                                                              frame["note"].fillna(""),
                                                              strict=True)],
    })  # fmt: skip
    return shown.to_markdown(index=False)


def _seeds(total: int, failed: int, missing: int) -> str:
    """``3/3``; ``FAILED 1/3``; ``MISSING 1/3``; ``FAILED 1/3, MISSING 1/3``."""
    if failed == 0 and missing == 0:
        return f"{total}/{total}"
    marks = [f"FAILED {failed}/{total}"] if failed else []
    return ", ".join(marks + ([f"MISSING {missing}/{total}"] if missing else []))


def plot_curves(curves: pd.DataFrame, out: Path, dataset: str, model: str) -> Path:
    """Test accuracy per epoch of every optimizer on one dataset and model."""
    path = out / f"curves_{dataset}_{model}.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    subset = curves[(curves["dataset"] == dataset) & (curves["model"] == model)]
    for optimizer, group in subset.groupby("optimizer", sort=False):
        by_epoch = group.groupby("epoch")["test_acc"]
        mean, std = by_epoch.mean() * 100, by_epoch.std().fillna(0) * 100
        ax.plot(mean.index, mean.to_numpy(), label=optimizer)
        ax.fill_between(mean.index, (mean - std).to_numpy(), (mean + std).to_numpy(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{dataset} / {model}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not subset.empty:
        ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def plot_final_accuracy(table: pd.DataFrame, path: Path) -> None:
    """Final test accuracy (mean ± std over seeds) per optimizer, grouped by dataset/model."""
    groups = list(dict.fromkeys(zip(table["dataset"], table["model"], strict=True)))
    optimizers = list(dict.fromkeys(table["optimizer"]))
    width = 0.8 / max(len(optimizers), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4))
    for i, optimizer in enumerate(optimizers):
        rows = table[table["optimizer"] == optimizer].set_index(["dataset", "model"])
        means = [rows["final_test_acc_mean"].get(g, np.nan) * 100 for g in groups]
        stds = [rows["final_test_acc_std"].get(g, np.nan) * 100 for g in groups]
        x = np.arange(len(groups)) + (i - (len(optimizers) - 1) / 2) * width
        ax.bar(x, means, width, yerr=np.nan_to_num(stds), capsize=3, label=optimizer)
    ax.set_xticks(np.arange(len(groups)), [f"{d}\n{m}" for d, m in groups])
    low = (table["final_test_acc_mean"] - table["final_test_acc_std"].fillna(0)).dropna() * 100
    high = (table["final_test_acc_mean"] + table["final_test_acc_std"].fillna(0)).dropna() * 100
    if not low.empty:
        ax.set_ylim(max(0.0, low.min() - 3), min(100.0, high.max() + 2))
    ax.set(ylabel="final test accuracy (%)")
    ax.legend(
        ncols=min(len(optimizers), 6),
        fontsize="small",
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18),
        frameon=False,
    )
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_accuracy_vs_sharpness(seeds: pd.DataFrame, path: Path) -> None:
    """Each seed's final accuracy against its sharpness (log scale), by optimizer."""
    ok = seeds[(seeds["status"] == "ok") & seeds["sharpness"].notna()]
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = "osD^v<>P*X"
    groups = list(dict.fromkeys(zip(ok["dataset"], ok["model"], strict=True)))
    colors = {name: f"C{i % 10}" for i, name in enumerate(ok["optimizer"].unique())}
    for optimizer, group in ok.groupby("optimizer", sort=False):
        for j, (dataset, model) in enumerate(groups):
            part = group[(group["dataset"] == dataset) & (group["model"] == model)]
            if part.empty:
                continue
            ax.scatter(
                part["sharpness"].clip(lower=1e-6),
                part["final_test_acc"] * 100,
                marker=markers[j % len(markers)],
                color=colors[optimizer],
                label=f"{optimizer} ({dataset}/{model})" if len(groups) > 1 else optimizer,
            )
    ax.set_xscale("log")
    ax.set(xlabel="sharpness: top Hessian eigenvalue (log)", ylabel="final test accuracy (%)")
    if not ok.empty:
        ax.legend(fontsize="x-small")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_open(path) as handle:
        frame.to_csv(handle, index=False)


def aggregate(
    cells: Sequence[Path],
    out: Path,
    baseline: str | None = None,
    candidates: Sequence[str] | None = None,
    grid: Grid | None = None,
) -> dict[str, Any]:
    """Write every output of the aggregate into ``out``; return the frames.

    The comparison is :func:`zsharp.grid.comparison`'s: by default every ZSharp entry
    against ``baseline`` (the grid's ``compare`` section when neither is given). ``grid``
    (:func:`zsharp.grid.load_grid`, ``cells=False`` is enough) adds the sensitivity plots of
    its swept entries and its published results.
    """
    seeds, curves = seed_rows(cells)
    if grid is not None and baseline is None and candidates is None:
        baseline, chosen_by_grid = grid_comparison(grid)
        candidates = chosen_by_grid if baseline is not None else None
    entries = dict(zip(seeds["optimizer"], seeds["method"].astype(str), strict=True))
    base, chosen = comparison(entries, baseline, None if candidates is None else list(candidates))
    table = cell_table(seeds)
    frames = {
        "seeds": seeds,
        "table": table,
        "comparison": paired_comparison(seeds, base or baseline, chosen),
        "published": published_table(table, grid.published if grid else []),
        "sensitivity": sensitivity_frame(table, grid.sweeps if grid else {}, base or baseline),
    }
    plots = sensitivity_plots(grid) if grid is not None else []
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "zsharp aggregate"):
        # a killed aggregate's temporary files: only aggregates write here
        for folder in (out, out / "plots"):
            remove_stale_temps(folder)
        frames["sensitivity_plots"] = _write_all(out, curves, frames, plots)
    return frames


def _write_all(
    out: Path,
    curves: pd.DataFrame,
    frames: dict[str, pd.DataFrame],
    sensitivity: Sequence[tuple[str, str, str]],
) -> dict[Path, pd.DataFrame]:
    """Write the tables and plots; return each sensitivity plot's drawn points."""
    seeds, table = frames["seeds"], frames["table"]
    _write_csv(seeds, out / "seeds.csv")
    _write_csv(table, out / "results.csv")
    _write_csv(frames["comparison"], out / "comparison.csv")
    _write_csv(frames["published"], out / "published.csv")
    _write_csv(frames["sensitivity"], out / "sensitivity.csv")
    with atomic_open(out / "results.md") as handle:
        handle.write(markdown(table, frames["comparison"], seeds, frames["published"]))
    plots = out / "plots"
    for dataset, model in dict.fromkeys(zip(seeds["dataset"], seeds["model"], strict=True)):
        plot_curves(curves, plots, dataset, model)
    plot_final_accuracy(table, plots / "final_accuracy.png")
    plot_accuracy_vs_sharpness(seeds, plots / "accuracy_vs_sharpness.png")
    drawn = {}
    for family, param, dataset in sensitivity:
        path = plots / SENSITIVITY_PLOT.format(family=family, param=param, dataset=dataset)
        drawn[path] = plot_sensitivity(frames["sensitivity"], family, param, dataset, path)
    return drawn
