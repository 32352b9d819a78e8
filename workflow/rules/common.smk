# The config, its validation, and the grid of cells. Everything a rule needs to know about a
# cell comes from zsharp.pipeline.grid.expand and its files' names from
# zsharp.pipeline.cell.folder; the rules only name files and call the `zsharp` command line.
import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from zsharp.data.prepared import check_prepared, dataset_dir, is_ready
from zsharp.pipeline.cell import folder
from zsharp.pipeline.cell.config import EVALUATE
from zsharp.pipeline.grid.expand import load_grid
from zsharp.pipeline.grid.schema import GridError

# `configfile:` would merge a --configfile into the default one (grids would add up), so
# the default is loaded only when no config file was given; a given file must name a grid.
if not workflow.overwrite_configfiles and not config:
    with open(Path(workflow.basedir) / "config" / "config.yaml") as handle:
        config.update(yaml.safe_load(handle))
elif not config:
    raise WorkflowError(
        f"invalid config: (top level): {workflow.overwrite_configfiles[0]} names no grid "
        "(datasets, models, optimizers and seeds are required)"
    )

try:
    GRID = load_grid(config)
except GridError as error:
    raise WorkflowError(f"invalid config: {error}") from None

C = GRID.config  # the config with the schema's defaults filled in
EXP = str(GRID.experiment_dir)  # results/<experiment>
DATA = C["data_root"]
LOGS = f"logs/{C['experiment']}"
CELL = "{dataset}/{model}/{label}/seed{seed}"

# where this run writes and reads, resolved (roots may be absolute): the first thing said
print(
    f"zsharp: results in {Path(EXP).resolve()}, data in {Path(DATA).resolve()}",
    file=sys.stderr,
    flush=True,
)

# A prepared dataset whose files no longer match its meta.json (a truncated array, say) is
# not prepared: its READY goes (the headers and sizes are checked, not the digests: a
# moment per dataset), so the download rule prepares it again before any training job.
for _dataset in C["datasets"]:
    _directory = dataset_dir(DATA, _dataset)
    if is_ready(_directory):
        _damage = check_prepared(_directory, digests=False)
        if _damage is not None:
            print(f"zsharp: {_damage}: it is prepared again", file=sys.stderr, flush=True)


def _alternatives(names):
    return "|".join(re.escape(str(n)) for n in names)


wildcard_constraints:
    dataset=_alternatives(C["datasets"]),
    model=_alternatives(C["models"]),
    label=_alternatives(C["optimizers"]),
    seed=_alternatives(C["seeds"]),


def cell_of(wildcards):
    return GRID.cell(wildcards.dataset, wildcards.model, wildcards.label, wildcards.seed)


def cell_dir(wildcards):
    return f"{EXP}/cells/{cell_of(wildcards).key}"


def failures_so_far(wildcards):
    """How many of the cell's recorded failures call for training it again: a new one
    changes this parameter, so the next run retries the cell (it stays put once the cell
    succeeds). Transient faults always count (they are no result); failures that would
    recur (a divergence) only with retry_failed."""
    return sum(
        1
        for entry in folder.read_failures(Path(cell_dir(wildcards)))
        if entry.get("transient") or C["retry_failed"]
    )


def resource(rule, key, default):
    return (C["resources"].get(rule) or {}).get(key, default)


# Runtime and W&B settings reach the jobs through the environment, not as parameters: they
# do not change what a cell computes, so changing them must not rerun it. A variable
# already set in the environment wins (e.g. `docker run -e WANDB_MODE=online`).
for _variable, _value in {
    "ZSHARP_DEVICE": C["runtime"].get("device"),
    "ZSHARP_COMPILE": {True: "1", False: "0"}.get(C["runtime"].get("compile")),
    "ZSHARP_GRAPHS": {True: "1", False: "0"}.get(C["runtime"].get("graphs")),
    "WANDB_MODE": C["wandb"].get("mode"),
    "WANDB_PROJECT": C["wandb"].get("project"),
    "WANDB_ENTITY": C["wandb"].get("entity"),
}.items():
    if _value is not None:
        os.environ.setdefault(_variable, str(_value))


def gpu_resources(rule):
    """The GPU request of a rule's jobs.

    `gpu` whole GPUs per job (`--resources gpu=N` bounds them; SLURM: --gpus), or with
    `cells_per_gpu: K > 1` one of K slots on each of `gpu` GPUs: such a job counts
    `gpu_slot` (`--resources gpu_slot=GPUs×K`) and no `gpu`, so K jobs share a device.
    `gpus_per_cell`, `cells_per_gpu` and `gpu_mem_mb` are read by the shell line
    (`zsharp-device`), `processes` (a data-parallel cell: torchrun ranks, default `gpu`)
    by `zsharp train`; resources are no rerun trigger, so changing them reruns nothing."""
    gpus = resource(rule, "gpu", 1)
    per_gpu = resource(rule, "cells_per_gpu", 1)
    resources = {
        "processes": resource(rule, "processes", max(gpus, 1)),
        "gpus_per_cell": gpus,
        "cells_per_gpu": per_gpu,
        "gpu_mem_mb": resource(rule, "gpu_mem_mb", 0),
        ("gpu_slot" if per_gpu > 1 else "gpu"): gpus,
    }
    if resource(rule, "gpu_model", None):
        resources["gpu_model"] = resource(rule, "gpu_model", None)
    return resources


def retries(rule):
    return resource(rule, "retries", 2)


ALL_CELLS = [f"{EXP}/cells/{cell.key}" for cell in GRID.cells]
DATASET_MODELS = [(d, m) for d in C["datasets"] for m in C["models"]]


def matched_flag(wildcards):
    """`--matched JSON` for a matched control's cell: the entry it matches, the norm, ρ."""
    matched = cell_of(wildcards).matched
    if matched is None:
        return ""
    record = {k: matched[k] for k in ("entry", "norm", "rho")}
    return f"--matched {shlex.quote(json.dumps(record, sort_keys=True))}"


def download_source(wildcards):
    source = (C["datasets"][wildcards.dataset] or {}).get("source")
    return f"--source {shlex.quote(source)}" if source else ""


def evaluate_options():
    """The config's `evaluate` section as `zsharp evaluate` flags (zsharp.pipeline.cell.config.EVALUATE)."""
    flags = []
    for arg in EVALUATE:
        flags += [f"--{arg.name.replace('_', '-')}", str(C["evaluate"][arg.name])]
    return shlex.join(flags)


def report_failures():
    """After the run: list the cells whose training failed (FAILED in the table: kept
    unless retry_failed) and those with no result after a transient fault (MISSING: the
    next run retries them)."""
    failed, missing = [], []
    for cell in ALL_CELLS:
        try:
            summary = folder.read_summary(Path(cell))
        except folder.RecordError:
            continue
        if summary.get("status") == "failed":
            (missing if summary.get("transient") else failed).append(cell)
    if failed:
        print(
            f"zsharp: {len(failed)} cell(s) failed and show as FAILED in {EXP}/results.md "
            "(a failure that would recur is a result: retry_failed: true trains them "
            "again):\n  " + "\n  ".join(failed)
        )
    if missing:
        print(
            f"zsharp: {len(missing)} cell(s) have no result after a transient fault and show "
            f"as MISSING in {EXP}/results.md; running snakemake again retries them:\n  "
            + "\n  ".join(missing)
        )
