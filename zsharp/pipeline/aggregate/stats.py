"""The statistics of the aggregate: per-cell means and stds over seeds, the paired
comparison with its p-values (Holm–Bonferroni over the table), published results beside
ours, and the sensitivity of swept entries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from zsharp.pipeline.aggregate.read import CELL, METRICS
from zsharp.pipeline.grid.expand import Sweep
from zsharp.pipeline.grid.published import Reference

CORRECTION = "Holm–Bonferroni"
# the within-spread test of a published result: |ours − published| ≤ SPREAD_Z · √(s² + s_pub²)
SPREAD_Z = 2.0


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


COMPARISON_COLUMNS = [
    "dataset", "model", "candidate", "baseline", "control", "metric", "pairs", "mean_diff",
    "std_diff", "ci95_low", "ci95_high", "wins", "p_value",
]  # fmt: skip


def paired_comparison(
    seeds: pd.DataFrame,
    comparisons: Sequence[tuple[str, str]],
    metric: str = "final_test_acc",
    matches: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Candidate minus baseline, paired by seed, per dataset and model: the mean difference,
    its std, its 95 % confidence interval (Student's t over the pairs: mean ±
    t(0.975, n − 1)·std/√n), the wins and a two-sided paired t-test's p.

    ``matches`` (matched entry → the entry it matches) adds, for each candidate that a
    matched control matches, the candidate minus that control (``control`` names it: the
    baseline whose ‖ε‖ equals the candidate's). ``comparisons``: (candidate, baseline)
    pairs of entries."""
    pairs = [(c, b, "") for c, b in comparisons]
    candidates = {c for c, _ in comparisons}
    for control, target in (matches or {}).items():
        if target in candidates:
            pairs.append((target, control, "matched ‖ε‖"))
    ok = seeds[seeds["status"] == "ok"]
    rows = []
    for (dataset, model), group in ok.groupby(["dataset", "model"], sort=False):
        for candidate, base_label, control in pairs:
            base = group[group["optimizer"] == base_label].set_index("seed")[metric]
            cand = group[group["optimizer"] == candidate].set_index("seed")[metric]
            common = base.index.intersection(cand.index)
            if len(common) == 0:
                continue
            diff = (cand[common] - base[common]).to_numpy(dtype=float)
            p_value, low, high = math.nan, math.nan, math.nan
            std = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
            if len(diff) >= 2:
                half = float(stats.t.ppf(0.975, len(diff) - 1)) * std / math.sqrt(len(diff))
                low, high = float(diff.mean()) - half, float(diff.mean()) + half
                if np.std(diff) > 0:
                    p_value = float(stats.ttest_rel(cand[common], base[common]).pvalue)
            rows.append({
                "dataset": dataset, "model": model, "candidate": candidate,
                "baseline": base_label, "control": control, "metric": metric,
                "pairs": len(diff), "mean_diff": float(diff.mean()), "std_diff": std,
                "ci95_low": low, "ci95_high": high, "wins": int((diff > 0).sum()),
                "p_value": p_value,
            })  # fmt: skip
    frame = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
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
