"""How long `snakemake -n` takes to validate the paper grid and build its whole DAG.

    python benchmarks/dry_run.py [--repeats 5]

Times `snakemake -n --configfile config/paper.yaml` (4 datasets × 5 models × 6 optimizer
entries × 3 seeds = 360 cells, 726 jobs) and, interleaved as a baseline, the dry run of a
one-rule Snakefile (Snakemake's own start-up, plugin discovery included). Reports medians
and the paper grid's cost above that baseline.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

from zsharp.atomic import write_json

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/dry_run.json")
    args = parser.parse_args()
    snakemake = str(Path(sys.executable).parent / "snakemake")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "Snakefile").write_text('rule a:\n    output: "x"\n    shell: "touch x"\n')
        paper = [
            snakemake,
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(work / "paper"),
            "-n",
            "-q",
            "--configfile",
            str(REPO / "config" / "paper.yaml"),
        ]
        trivial = [snakemake, "-n", "-q", "--cores", "1"]
        timed(paper, work)  # warm the file cache
        samples: dict[str, list[float]] = {"paper": [], "trivial": []}
        for _ in range(args.repeats):
            samples["paper"].append(timed(paper, work))
            samples["trivial"].append(timed(trivial, work))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    print(
        f"paper grid dry run: {medians['paper']:.2f} s (median of {args.repeats}); "
        f"one-rule Snakefile: {medians['trivial']:.2f} s; "
        f"the grid's own cost: {medians['paper'] - medians['trivial']:.2f} s"
    )
    write_json(
        args.out,
        {
            "benchmark": "dry_run",
            "machine": machine(),
            "cells": 360,
            "seconds": samples,
            "median_seconds": medians,
        },
    )


if __name__ == "__main__":
    main()
