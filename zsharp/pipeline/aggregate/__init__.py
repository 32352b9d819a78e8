"""Aggregate finished cells into a table, a paired comparison, plots and a W&B run.

By job: :mod:`~zsharp.pipeline.aggregate.read` (cells into rows),
:mod:`~zsharp.pipeline.aggregate.stats` (means, comparisons, p-values),
:mod:`~zsharp.pipeline.aggregate.tables` (CSV and markdown) and
:mod:`~zsharp.pipeline.aggregate.plots`; :func:`aggregate` runs them all.

Per cell (dataset × model × optimizer entry) the mean ± std over seeds of the final and
best test accuracy, test loss, ECE, sharpness, final train loss and training time. A seed
whose training failed for good (a divergence, a configuration that cannot run) is counted
and shown as FAILED; one with no result (a transient fault on its last attempt, which the
next run retries; a summary that is absent or unreadable) as MISSING, with the reason and a
warning naming the file, instead of breaking the table. The
paired comparison takes each candidate (e.g. ZSharp, or every value of a swept ZSharp entry)
minus the baseline (SAM) seed by seed and reports the mean difference, its std, the wins, a
paired t-test's p-value and that p-value adjusted by Holm–Bonferroni over every comparison
of the table (Holm's step-down).

Given the grid (:func:`~zsharp.pipeline.grid.expand.load_grid`), also the sensitivity of
each swept entry (final test accuracy against the swept value) and the grid's
``published`` results beside ours.

Outputs in ``out``: ``results.csv`` (one row per cell), ``seeds.csv`` (one row per seed),
``comparison.csv``, ``published.csv``, ``sensitivity.csv``, ``results.md`` (the tables,
readable) and ``plots/``: ``curves_<dataset>_<model>.png`` (test accuracy per epoch, mean and
std band over seeds, one line per optimizer), ``final_accuracy.png``,
``accuracy_vs_sharpness.png`` and ``sensitivity_<family>_<key>_<dataset>.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from zsharp.atomic import DirectoryLock, remove_stale_temps
from zsharp.pipeline.aggregate.plots import (
    plot_accuracy_vs_epsilon,
    plot_accuracy_vs_sharpness,
    plot_curves,
    plot_final_accuracy,
    plot_sensitivity,
)
from zsharp.pipeline.aggregate.read import AggregateError, seed_rows
from zsharp.pipeline.aggregate.stats import (
    cell_table,
    paired_comparison,
    published_table,
    sensitivity_frame,
)
from zsharp.pipeline.aggregate.tables import markdown, write_csv, write_markdown
from zsharp.pipeline.grid.expand import (
    EPSILON_PLOT,
    SENSITIVITY_PLOT,
    Grid,
    comparison,
    comparison_pairs,
    grid_comparison,
    sensitivity_plots,
)

__all__ = ["AggregateError", "aggregate"]


def aggregate(
    cells: Sequence[Path],
    out: Path,
    baseline: str | None = None,
    candidates: Sequence[str] | None = None,
    grid: Grid | None = None,
) -> dict[str, Any]:
    """Write every output of the aggregate into ``out``; return the frames.

    The comparison is :func:`~zsharp.pipeline.grid.expand.comparison`'s: by default every
    ZSharp entry against ``baseline`` (the grid's ``compare`` section when neither is
    given). ``grid`` (:func:`~zsharp.pipeline.grid.expand.load_grid`, ``cells=False`` is
    enough) adds the sensitivity plots of its swept entries and its published results.
    """
    seeds, curves = seed_rows(cells)
    entries = dict(zip(seeds["optimizer"], seeds["method"].astype(str), strict=True))
    if grid is not None and baseline is None and candidates is None:
        pairs = comparison_pairs(grid)
        base, _ = grid_comparison(grid)  # the sensitivity plots' level (None if swept)
    else:
        base, chosen = comparison(
            entries, baseline, None if candidates is None else list(candidates)
        )
        pairs = [(c, base) for c in chosen] if base is not None else []
    table = cell_table(seeds)
    matches = {}
    if "matches" in seeds:
        matched = seeds[seeds["matches"].notna()]
        matches = dict(zip(matched["optimizer"], matched["matches"], strict=True))
    frames = {
        "seeds": seeds,
        "table": table,
        "comparison": paired_comparison(seeds, pairs, matches=matches),
        "published": published_table(table, grid.published if grid else []),
        "sensitivity": sensitivity_frame(table, grid.sweeps if grid else {}, base),
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
    write_csv(seeds, out / "seeds.csv")
    write_csv(table, out / "results.csv")
    write_csv(frames["comparison"], out / "comparison.csv")
    write_csv(frames["published"], out / "published.csv")
    write_csv(frames["sensitivity"], out / "sensitivity.csv")
    write_markdown(
        markdown(table, frames["comparison"], seeds, frames["published"]), out / "results.md"
    )
    plots = out / "plots"
    for dataset, model in dict.fromkeys(zip(seeds["dataset"], seeds["model"], strict=True)):
        plot_curves(curves, plots, dataset, model)
    plot_final_accuracy(table, plots / "final_accuracy.png")
    for dataset, model in dict.fromkeys(zip(table["dataset"], table["model"], strict=True)):
        path = plots / EPSILON_PLOT.format(dataset=dataset, model=model)
        plot_accuracy_vs_epsilon(table, dataset, model, path)
    plot_accuracy_vs_sharpness(seeds, plots / "accuracy_vs_sharpness.png")
    drawn = {}
    for family, param, dataset in sensitivity:
        path = plots / SENSITIVITY_PLOT.format(family=family, param=param, dataset=dataset)
        drawn[path] = plot_sensitivity(frames["sensitivity"], family, param, dataset, path)
    return drawn
