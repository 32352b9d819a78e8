"""Aggregate finished cells into a table, a paired comparison, plots and a W&B run.

Per cell (dataset × model × optimizer entry) the mean ± std over seeds of the final and
best test accuracy, test loss, ECE, sharpness, final train loss and training time. A seed
whose training failed for good (a divergence, a configuration that cannot run) is counted
and shown as FAILED; one with no result (a transient fault on its last attempt, which the
next run retries; a summary that is absent or unreadable) as MISSING, with the reason and a
warning naming the file, instead of breaking the table. The
paired comparison takes each candidate (e.g. ZSharp) minus the baseline (SAM) seed by seed
and reports the mean difference, its std, the wins and a paired t-test.

Outputs in ``out``: ``results.csv`` (one row per cell), ``seeds.csv`` (one row per seed),
``comparison.csv``, ``results.md`` (both tables, readable) and ``plots/``:
``curves_<dataset>_<model>.png`` (test accuracy per epoch, mean and std band over seeds, one
line per optimizer), ``final_accuracy.png`` and ``accuracy_vs_sharpness.png``.
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
from zsharp.grid import comparison

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
    return pd.DataFrame(
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


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown(table: pd.DataFrame, comparison: pd.DataFrame, seeds: pd.DataFrame) -> str:
    """The human-readable results: cells, comparison, failures."""
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
        })  # fmt: skip
        parts += ["## Paired comparison over seeds", "", comp.to_markdown(index=False), ""]
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
) -> dict[str, Any]:
    """Write every output of the aggregate into ``out``; return the frames.

    The comparison is :func:`zsharp.grid.comparison`'s: by default every ZSharp entry
    against ``baseline``.
    """
    seeds, curves = seed_rows(cells)
    entries = dict(zip(seeds["optimizer"], seeds["method"].astype(str), strict=True))
    base, chosen = comparison(entries, baseline, None if candidates is None else list(candidates))
    table = cell_table(seeds)
    comparison_frame = paired_comparison(seeds, base or baseline, chosen)
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "zsharp aggregate"):
        # a killed aggregate's temporary files: only aggregates write here
        for folder in (out, out / "plots"):
            remove_stale_temps(folder)
        _write_all(out, seeds, curves, table, comparison_frame)
    return {"seeds": seeds, "table": table, "comparison": comparison_frame}


def _write_all(
    out: Path,
    seeds: pd.DataFrame,
    curves: pd.DataFrame,
    table: pd.DataFrame,
    comparison_frame: pd.DataFrame,
) -> None:
    _write_csv(seeds, out / "seeds.csv")
    _write_csv(table, out / "results.csv")
    _write_csv(comparison_frame, out / "comparison.csv")
    with atomic_open(out / "results.md") as handle:
        handle.write(markdown(table, comparison_frame, seeds))
    plots = out / "plots"
    for dataset, model in dict.fromkeys(zip(seeds["dataset"], seeds["model"], strict=True)):
        plot_curves(curves, plots, dataset, model)
    plot_final_accuracy(table, plots / "final_accuracy.png")
    plot_accuracy_vs_sharpness(seeds, plots / "accuracy_vs_sharpness.png")
