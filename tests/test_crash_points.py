"""A crash at every write point: SIGKILL there, run again, and the end is the same.

As SQLite's crash tests and ALICE do: each scenario runs once uninterrupted while
``tests/crash_points.py`` lists every point at which the command writes (creates, appends
to, renames into place or removes a file under the cell or the aggregate's folder, or calls
W&B); then, for each point N in turn, a fresh copy of the starting state, the command killed
with SIGKILL at point N, the same command run again to its end. The end must equal the
uninterrupted run's (weights and per-epoch numbers bit for bit, records equal but for
their timings), no temporary file may be left, and at the moment of every kill the folder
must be consistent: a summary present belongs to the metrics and weights beside it, and an
earlier result is either still whole or already replaced by the new run's.

Scenarios (digits and a ResNet-20, two epochs of ZSharp at batch 512: three steps an epoch):
a fresh cell (W&B offline), a retrain of a finished cell, a diverging cell whose failure is
recorded, the evaluation of a cell, the aggregate of cells.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.workflow_helpers import CommandServer
from zsharp.pipeline.cell import checkpoint

pytestmark = pytest.mark.slow

TRAIN = ["train", "--dataset", "digits", "--model", "resnet20", "--optimizer", "zsharp",
         "--epochs", "2", "--batch-size", "512", "--threads", "1",
         "--progress", "lines"]  # fmt: skip
DIVERGES = ["train", "--dataset", "digits", "--model", "resnet20", "--optimizer", "sgd",
            "--epochs", "2", "--batch-size", "512", "--threads", "1", "--lr", "1e6",
            "--momentum", "0", "--schedule", "constant", "--record-failure"]  # fmt: skip
EVALUATE = ["--hessian-samples", "32", "--hessian-iterations", "2"]
DETERMINISTIC = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
                 "grad_norm", "epsilon_norm", "kept_fraction", "sam_sharpness")  # fmt: skip
SERVER: list[CommandServer] = []


@pytest.fixture(scope="module", autouse=True)
def _command_server(cli: CommandServer) -> Iterator[None]:
    SERVER.append(cli)
    yield
    SERVER.remove(cli)


def run(args: list[str], under: list[Path], *, at: int = 0, log: Path | None = None,
        wandb: str = "disabled") -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``zsharp ARGS`` with the write points under ``under`` watched (killed at ``at``)."""
    env = {
        **os.environ,
        "WANDB_MODE": wandb,
        "ZSHARP_CRASH_UNDER": ",".join(str(p) for p in under),
        "ZSHARP_CRASH_AT": str(at),
    }
    if log is not None:
        env["ZSHARP_CRASH_LOG"] = str(log)
    return SERVER[-1].run(args, env=env)


def points(args: list[str], under: list[Path], scratch: Path, **kwargs: Any) -> list[dict]:
    """The write points of an uninterrupted run, in order."""
    log = scratch / "points.jsonl"
    log.unlink(missing_ok=True)
    result = run(args, under, log=log, **kwargs)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


# --- what a folder must look like -------------------------------------------------------------


def records(cell: Path) -> list[dict]:
    lines = (cell / "metrics.jsonl").read_text().splitlines()
    return [{k: r.get(k) for k in DETERMINISTIC} for r in map(json.loads, lines)]


def weights(cell: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(cell / "model.pt")


def summary(cell: Path) -> dict:
    return json.loads((cell / "summary.json").read_text())


def assert_same_cell(cell: Path, reference: Path) -> None:
    assert records(cell) == records(reference)
    ours, theirs = weights(cell), weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    a, b = summary(cell), summary(reference)
    for key in ("status", "config", "config_digest", "best"):
        assert a[key] == b[key], key
    assert {k: a["final"].get(k) for k in DETERMINISTIC} == {
        k: b["final"].get(k) for k in DETERMINISTIC
    }
    assert not (cell / "checkpoint.pt").exists()
    assert_no_temporary_file(cell)


def assert_no_temporary_file(folder: Path) -> None:
    left = [p.name for p in folder.rglob(".*.tmp") if "wandb" not in p.parts]
    assert not left, left


def assert_consistent(cell: Path) -> None:
    """At any moment: a summary.json present is a whole one, and belongs to the metrics
    (and, for a finished cell, the weights) beside it."""
    path = cell / "summary.json"
    if not path.exists():
        return
    s = summary(cell)  # whole JSON (it was renamed into place)
    if s["status"] == "ok":
        assert records(cell)[-1] == {k: s["final"].get(k) for k in DETERMINISTIC}
        assert (cell / "model.pt").exists()
        weights(cell)  # readable


# --- the matrix ---------------------------------------------------------------------------------


def matrix(
    start: Callable[[Path], list[Path]],
    args: Callable[[Path], list[str]],
    check_end: Callable[[Path], None],
    scratch: Path,
    *,
    during: Callable[[Path], None] = lambda _: None,
    wandb: str = "disabled",
) -> list[dict]:
    """For every write point of ``args``: a fresh start (``start(folder)`` returns the
    folders to watch), SIGKILL at the point, ``during`` checks what the kill left, the same
    command again, ``check_end`` its end. Returns the points."""
    first = scratch / "count"
    under = start(first)
    found = points(args(first), under, scratch, wandb=wandb)
    assert found, "no write point found"
    check_end(first)
    for point in found:
        folder = scratch / f"kill-{point['n']}"
        under = start(folder)
        killed = run(args(folder), under, at=point["n"], wandb=wandb)
        assert killed.returncode == -9, (point, killed.returncode, killed.stderr)
        during(folder)
        again = run(args(folder), under, wandb=wandb)
        assert again.returncode == 0, (point, again.stderr)
        check_end(folder)
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> Path:
    """The uninterrupted cell every rerun must end as."""
    cell = tmp_path_factory.mktemp("reference") / "cell"
    result = SERVER[-1].run(
        [*TRAIN, "--out", str(cell), "--data-root", str(data_root)],
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr
    return cell


def kinds(found: list[dict]) -> set[str]:
    return {p["kind"].split(".")[0] for p in found}


def test_a_fresh_cell(reference: Path, data_root: Path, tmp_path: Path) -> None:
    def start(folder: Path) -> list[Path]:
        folder.mkdir()
        return [folder]

    def check_end(folder: Path) -> None:
        assert_same_cell(folder / "cell", reference)
        assert list((folder / "cell").glob("wandb/offline-run-*/run-*.wandb"))

    found = matrix(
        start,
        lambda folder: [*TRAIN, "--out", str(folder / "cell"), "--data-root", str(data_root)],
        check_end,
        tmp_path,
        during=lambda folder: assert_consistent(folder / "cell"),
        wandb="offline",
    )
    assert {"create", "rename", "remove", "wandb"} <= kinds(found)
    names = {Path(p["path"]).name for p in found if p["kind"] == "rename"}
    assert {"metrics.jsonl", "checkpoint.pt", "model.pt", "summary.json"} <= names


def test_a_retrain_of_a_finished_cell(reference: Path, data_root: Path, tmp_path: Path) -> None:
    """The finished cell run again: at every kill the folder holds either the earlier
    result whole or the new run's files, never a summary of other metrics."""

    def start(folder: Path) -> list[Path]:
        folder.mkdir()
        shutil.copytree(reference, folder / "cell")
        return [folder]

    found = matrix(
        start,
        lambda folder: [*TRAIN, "--out", str(folder / "cell"), "--data-root", str(data_root)],
        lambda folder: assert_same_cell(folder / "cell", reference),
        tmp_path,
        during=lambda folder: assert_consistent(folder / "cell"),
    )
    removed = {Path(p["path"]).name for p in found if p["kind"] == "remove"}
    assert {"summary.json", "model.pt", "metrics.jsonl"} <= removed


def test_a_recorded_divergence(data_root: Path, tmp_path: Path) -> None:
    """A cell that diverges and records it: however it is killed, the next run records the
    same failure (one failures.jsonl line per attempt that got to record it)."""
    error = []

    def start(folder: Path) -> list[Path]:
        folder.mkdir()
        return [folder]

    def check_end(folder: Path) -> None:
        s = summary(folder / "cell")
        assert s["status"] == "failed" and s["transient"] is False
        assert "non-finite training loss" in s["error"]
        error.append(s["error"].replace(str(folder), "<folder>"))
        lines = (folder / "cell" / "failures.jsonl").read_text().splitlines()
        assert 1 <= len(lines) <= 2 and all(json.loads(x)["error"] == s["error"] for x in lines)
        assert_no_temporary_file(folder / "cell")

    found = matrix(
        start,
        lambda folder: [*DIVERGES, "--out", str(folder / "cell"), "--data-root", str(data_root)],
        check_end,
        tmp_path,
        during=lambda folder: assert_consistent(folder / "cell"),
    )
    assert "append" in kinds(found) and len(set(error)) == 1


def test_an_evaluation(reference: Path, data_root: Path, tmp_path: Path) -> None:
    expected: dict[str, Any] = {}

    def start(folder: Path) -> list[Path]:
        folder.mkdir()
        shutil.copytree(reference, folder / "cell")
        return [folder]

    def check_end(folder: Path) -> None:
        result = json.loads((folder / "cell" / "eval.json").read_text())
        result = {k: v for k, v in result.items() if "seconds" not in k and k != "time"}
        expected.setdefault("eval", result)
        assert result == expected["eval"]
        assert_same_cell(folder / "cell", reference)

    args = ["evaluate", "--data-root", str(data_root), *EVALUATE]
    found = matrix(
        start, lambda folder: [*args, "--cell", str(folder / "cell")], check_end, tmp_path
    )
    assert "eval.json" in {Path(p["path"]).name for p in found}


def test_an_aggregate(reference: Path, tmp_path: Path) -> None:
    """Every table and plot of the aggregate, killed anywhere, ends byte for byte as the
    uninterrupted aggregate's."""
    expected: dict[str, bytes] = {}

    def start(folder: Path) -> list[Path]:
        folder.mkdir()
        shutil.copytree(reference, folder / "cells/digits/resnet20/zsharp/seed0")
        return [folder / "table"]

    def check_end(folder: Path) -> None:
        files = {
            str(p.relative_to(folder / "table")): p.read_bytes()
            for p in sorted((folder / "table").rglob("*"))
            if p.is_file() and "wandb" not in p.parts and p.name != ".zsharp.lock"
        }
        expected.update({k: v for k, v in files.items() if k not in expected})
        assert files == expected
        assert_no_temporary_file(folder / "table")

    def args(folder: Path) -> list[str]:
        cell = folder / "cells/digits/resnet20/zsharp/seed0"
        return ["aggregate", str(cell), "--out", str(folder / "table")]

    found = matrix(start, args, check_end, tmp_path)
    published = {Path(p["path"]).name for p in found if p["kind"] == "rename"}
    assert {"results.csv", "results.md", "comparison.csv", "final_accuracy.png"} <= published
