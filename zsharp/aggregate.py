"""Aggregate finished cells into a table, a paired comparison, plots and a W&B run.

Per cell (dataset × model × optimizer entry) the mean ± std over seeds of the final and
best test accuracy, test loss, ECE, sharpness, final train loss and training time; a cell
whose training failed is counted and shown as FAILED instead of breaking the table. The
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

from zsharp.atomic import atomic_open
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


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def cell_identity(cell: Path, summary: dict[str, Any]) -> tuple[str, str, str, int]:
    """(dataset, model, optimizer entry, seed) of a cell, as its summary records them: the
    entry is the grid's label (two entries may share one optimizer), else the optimizer."""
    config = summary.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{cell / 'summary.json'}: missing, or it records no configuration")
    label = summary.get("label") or config["optimizer"]
    return config["dataset"], config["model"], label, int(config["seed"])


def seed_rows(cells: Sequence[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per cell directory (a seed) and the per-epoch curves of all of them."""
    rows, curves = [], []
    for cell in cells:
        cell = Path(cell)
        summary = _read_json(cell / "summary.json") or {}
        evaluation = _read_json(cell / "eval.json") or {}
        dataset, model, label, seed = cell_identity(cell, summary)
        status = summary.get("status", "ok")
        row: dict[str, Any] = {
            "dataset": dataset, "model": model, "optimizer": label, "seed": seed,
            "method": summary.get("config", {}).get("optimizer", label), "status": status,
            "error": summary.get("error", ""),
        }  # fmt: skip
        if status == "ok":
            final = summary["final"]
            row |= {
                "final_test_acc": final["test_acc"],
                "best_test_acc": summary["best"]["test_acc"],
                "test_loss": final["test_loss"],
                "final_train_loss": final["train_loss"],
                "train_seconds": summary["train_seconds"],
                "ece": evaluation.get("ece", math.nan),
                "sharpness": evaluation.get("sharpness", math.nan),
            }
        rows.append(row)
        metrics = cell / "metrics.jsonl"
        if status == "ok" and metrics.exists():
            for line in metrics.read_text().splitlines():
                record = json.loads(line)
                curves.append(
                    {
                        **{k: row[k] for k in (*CELL, "seed")},
                        "epoch": record["epoch"],
                        "test_acc": record["test_acc"],
                    }
                )
    frame = pd.DataFrame(rows)
    for metric in METRICS:
        if metric not in frame:
            frame[metric] = math.nan
    return frame, pd.DataFrame(curves, columns=[*CELL, "seed", "epoch", "test_acc"])


def cell_table(seeds: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over the successful seeds of every metric, per cell."""
    grouped = seeds.groupby(CELL, sort=False)
    table = grouped.agg(
        seeds=("seed", "size"), failed=("status", lambda s: int((s != "ok").sum()))
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
        "seeds": [f"{s - f}/{s}" if f == 0 else f"FAILED {f}/{s}"
                  for s, f in zip(table["seeds"], table["failed"], strict=True)],
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
    failed = seeds[seeds["status"] != "ok"]
    if not failed.empty:
        parts += ["## Failed cells", ""]
        for _, row in failed.iterrows():
            parts.append(
                f"- {row['dataset']}/{row['model']}/{row['optimizer']}/seed"
                f"{row['seed']}: {row['status']} {row['error']}".rstrip()
            )
        parts.append("")
    return "\n".join(parts)


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
    return {"seeds": seeds, "table": table, "comparison": comparison_frame}
