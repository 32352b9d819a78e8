"""The aggregate's plots: test accuracy per epoch, final accuracy per entry, accuracy against
sharpness, and the sensitivity of swept entries. PNG files only (no display on clusters),
each written atomically."""

from __future__ import annotations

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

from zsharp.atomic import atomic_open
from zsharp.optim.args import is_number
from zsharp.pipeline.aggregate.stats import SENSITIVITY_COLUMNS


def log_axis(values: Sequence[Any]) -> bool:
    """Whether swept values are drawn on a log axis: all numbers, all positive, and the
    largest at least 10 times the smallest (they span a decade or more)."""
    if not values or not all(is_number(v) for v in values):
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
    numeric = all(is_number(v) for v in values)
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


def plot_accuracy_vs_epsilon(table: pd.DataFrame, dataset: str, model: str, path: Path) -> None:
    """Final test accuracy (mean ± std over seeds) of every entry of one dataset and model
    against its mean perturbation norm ‖ε‖ (± std): does accuracy follow the perturbation
    size, or the filter? Entries without an ascent (SGD, Adam) are a dashed level."""
    part = table[(table["dataset"] == dataset) & (table["model"] == model)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (_, row) in enumerate(part.iterrows()):
        y, yerr = row["final_test_acc_mean"] * 100, row["final_test_acc_std"] * 100
        color = f"C{i % 10}"
        if pd.isna(row.get("epsilon_norm_mean")):
            if not pd.isna(y):
                ax.axhline(y, color=color, linestyle="--", linewidth=1, label=row["optimizer"])
            continue
        ax.errorbar(
            row["epsilon_norm_mean"], y, xerr=np.nan_to_num(row["epsilon_norm_std"]),
            yerr=np.nan_to_num(yerr), marker="o", capsize=3, color=color, label=row["optimizer"],
        )  # fmt: skip
    values = part["epsilon_norm_mean"].dropna()
    if log_axis(list(values)):
        ax.set_xscale("log")
    ax.set(xlabel="perturbation norm ‖ε‖ (mean over the last epoch's steps)",
           ylabel="final test accuracy (%)", title=f"{dataset} / {model}")  # fmt: skip
    if not part.empty:
        ax.legend(fontsize="x-small", ncols=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
