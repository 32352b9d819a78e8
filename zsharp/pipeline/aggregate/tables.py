"""The aggregate's tables as files: CSV, and ``results.md`` for people."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from zsharp.atomic import atomic_open
from zsharp.pipeline.aggregate.stats import CORRECTION, SPREAD_Z


def _interval(low: float, high: float) -> str:
    """[low, high] in percentage points, or – without two pairs."""
    if pd.isna(low):
        return "–"
    return f"[{low * 100:+.2f}, {high * 100:+.2f}]"


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


#: the results table's per-entry columns: (title, metric, scale, decimals), each shown as
#: the mean ± std over seeds of ``<metric>_mean`` and ``<metric>_std``
COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("final acc %", "final_test_acc", 100, 2),
    ("best acc %", "best_test_acc", 100, 2),
    ("test loss", "test_loss", 1, 3),
    ("ECE %", "ece", 100, 2),
    ("sharpness", "sharpness", 1, 3),
    ("train loss", "final_train_loss", 1, 4),
    ("‖ε‖", "epsilon_norm", 1, 3),
    ("time s", "train_seconds", 1, 0),
)


def _mean_std(table: pd.DataFrame, metric: str, scale: float, digits: int) -> list[str]:
    """``mean ± std`` of one metric, a string per row."""
    pairs = zip(table[f"{metric}_mean"], table[f"{metric}_std"], strict=True)
    return [_pm(m, s, scale, digits) for m, s in pairs]


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
        **{title: _mean_std(table, metric, scale, digits)
           for title, metric, scale, digits in COLUMNS},
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
            "comparison": [f"{c} − {b}" + (f" ({k})" if k else "") for c, b, k in
                           zip(comparison["candidate"], comparison["baseline"],
                               comparison["control"], strict=True)],
            "final acc diff (pp)": [_pm(m, s, 100) for m, s in
                                    zip(comparison["mean_diff"], comparison["std_diff"],
                                        strict=True)],
            "95 % CI (pp)": [_interval(lo, hi) for lo, hi in
                             zip(comparison["ci95_low"], comparison["ci95_high"], strict=True)],
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
            "Candidate minus baseline, paired by seed. 95 % CI: the mean difference ± "
            "t(0.975, n − 1)·std/√n over the n pairs (an interval that excludes 0 is a "
            "difference the seeds resolve); p: two-sided paired t-test over seeds; Holm p: "
            f"adjusted for multiple comparisons with {CORRECTION} over the {tested} tested "
            "comparisons of this table (family-wise error rate). *matched ‖ε‖*: the baseline "
            "is a control whose ρ makes its perturbation norm equal the candidate's.",
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


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_open(path) as handle:
        frame.to_csv(handle, index=False)


def write_markdown(text: str, path: Path) -> None:
    with atomic_open(path) as handle:
        handle.write(text)
