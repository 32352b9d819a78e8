"""Nothing lost: a refused run deletes nothing, damaged prepared data is mended (never
recorded as a result), and a grid too big to plan is refused in one line.

Each test reproduces a fault as a user's cluster produces it — a set-aside checkpoint left
in a finished cell, a truncated or altered prepared array, a config with 700,000 seeds —
through the real command line and the real ``snakemake``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.archives import make_cifar10
from tests.workflow_helpers import (
    CommandServer,
    environment,
    snakemake,
    tiny_config,
    write_config,
)
from zsharp.data import download_dataset

CELL = ["--dataset", "digits", "--model", "resnet20", "--optimizer", "sgd", "--seed", "3",
        "--epochs", "1", "--batch-size", "256", "--threads", "1",
        "--progress", "lines"]  # fmt: skip
RESULTS = ("summary.json", "model.pt", "metrics.jsonl", "eval.json")
SERVER: list[CommandServer] = []


@pytest.fixture(scope="module", autouse=True)
def _command_server(cli: CommandServer) -> Iterator[None]:
    SERVER.append(cli)
    yield
    SERVER.remove(cli)


def zsharp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m zsharp ARGS`` as a fresh process (forked from the command server)."""
    return SERVER[-1].run(list(args), env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def own_data(data_root: Path, where: Path) -> Path:
    """A private copy of the session's prepared digits (these tests damage it)."""
    shutil.copytree(data_root, where)
    return where


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root) -> Path:
    """A finished cell (trained, evaluated)."""
    out = tmp_path_factory.mktemp("finished") / "cell"
    result = zsharp("train", *CELL, "--out", str(out), "--data-root", str(data_root))
    assert result.returncode == 0, result.stderr
    result = zsharp("evaluate", "--cell", str(out), "--data-root", str(data_root),
                    "--hessian-samples", "32", "--hessian-iterations", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def contents(cell: Path) -> dict[str, bytes]:
    return {name: (cell / name).read_bytes() for name in RESULTS if (cell / name).exists()}


# --- 1. files the project writes never make a folder "not a cell"; refusals delete nothing ---


@pytest.mark.parametrize("flags", [[], ["--record-failure", "--attempt", "1", "3"]],
                         ids=["plain", "workflow flags"])  # fmt: skip
def test_a_set_aside_checkpoint_never_makes_a_cell_unusable(
    flags: list[str], finished: Path, data_root: Path, tmp_path: Path
) -> None:
    """The trainer's own `checkpoint.pt.corrupt-<time>` in a finished cell: a rerun
    retrains the cell (it used to delete the results, then refuse the folder for good)."""
    cell = tmp_path / "cell"
    shutil.copytree(finished, cell)
    (cell / "checkpoint.pt.corrupt-20261203T071836").write_bytes(b"torn")
    result = zsharp("train", *CELL, "--out", str(cell), "--data-root", str(data_root), *flags)
    assert result.returncode == 0, result.stderr
    assert json.loads((cell / "summary.json").read_text())["status"] == "ok"
    assert (cell / "model.pt").exists() and (cell / "checkpoint.pt.corrupt-20261203T071836")
    # and a third run too: nothing the project wrote turned the folder into a stranger's
    again = zsharp("train", *CELL, "--out", str(cell), "--data-root", str(data_root), *flags)
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(
    ("refusal", "key"),
    [
        # only the data tell: the last batch holds 1437 % 256 = 157 images
        (["--micro-batches", "200"], "micro_batches"),
        (["--model-arg", "shortcut=C"], "shortcut"),
    ],
)
def test_a_refused_rerun_deletes_nothing(
    refusal: list[str], key: str, finished: Path, data_root: Path, tmp_path: Path
) -> None:
    """A rerun refused by a check that needs the data or the model (exit 2, one line)
    leaves every file of the finished cell as it was, byte for byte."""
    cell = tmp_path / "cell"
    shutil.copytree(finished, cell)
    before = contents(cell)
    assert set(before) == set(RESULTS)
    result = zsharp("train", *CELL, *refusal, "--out", str(cell), "--data-root", str(data_root))
    assert result.returncode == 2 and key in one_line(result)
    assert contents(cell) == before


def test_a_rerun_on_damaged_data_deletes_nothing(tmp_path: Path) -> None:
    """Damaged data of a dataset that must be downloaded: exit 2, one line naming the file
    and the command that prepares it again; the finished cell's files untouched."""
    root = tmp_path / "data"
    archive = make_cifar10(tmp_path / "archives", per_batch=4, n_test=6)
    download_dataset("cifar10", root, archive.path, md5=archive.md5, progress=False)
    cell = tmp_path / "cell"
    command = ["train", "--dataset", "cifar10", "--model", "resnet20", "--optimizer", "sgd",
               "--epochs", "1", "--batch-size", "10", "--threads", "1", "--eval-batch-size",
               "6"]  # fmt: skip
    assert zsharp(*command, "--out", str(cell), "--data-root", str(root)).returncode == 0
    before = contents(cell)
    with (root / "cifar10" / "train_x.npy").open("r+b") as handle:
        handle.truncate(handle.seek(0, os.SEEK_END) - 7)
    result = zsharp(*command, "--out", str(cell), "--data-root", str(root))
    line = one_line(result)
    assert result.returncode == 2, result.stderr
    assert "train_x.npy" in line and "truncated" in line
    assert f"zsharp download cifar10 --root {root}" in line
    assert contents(cell) == before
    assert not (root / "cifar10" / "READY").exists()  # no longer counts as prepared


# --- 2. prepared data verified against meta.json ---------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "one byte changed"])
def test_damaged_embedded_data_is_prepared_again_and_trains(
    damage: str, data_root: Path, tmp_path: Path
) -> None:
    """The embedded digits, damaged under a READY marker: training notices before it
    reads them, prepares them again (they need no network) and trains as on good data."""
    root = own_data(data_root, tmp_path / "data")
    array = root / "digits" / "test_x.npy"
    good = array.read_bytes()
    if damage == "truncated":
        array.write_bytes(good[:-100])
    else:
        array.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    result = zsharp("train", *CELL, "--out", str(tmp_path / "cell"), "--data-root", str(root))
    assert result.returncode == 0, result.stderr
    assert array.read_bytes() == good
    reference = zsharp("train", *CELL, "--out", str(tmp_path / "ref"), "--data-root",
                       str(data_root))  # fmt: skip
    assert reference.returncode == 0
    ours = json.loads((tmp_path / "cell" / "metrics.jsonl").read_text().splitlines()[0])
    theirs = json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[0])
    assert ours["test_acc"] == theirs["test_acc"] and ours["train_loss"] == theirs["train_loss"]


def test_zsharp_download_mends_a_damaged_dataset(tmp_path: Path) -> None:
    """`zsharp download` on a READY dataset checks it (digests too) and prepares it again
    when a file differs, from the source it is given; a sound one it leaves alone."""
    root = tmp_path / "data"
    archive = make_cifar10(tmp_path / "archives")
    args = ["download", "cifar10", "--root", str(root), "--source", str(archive.path),
            "--no-verify"]  # fmt: skip
    assert zsharp(*args).returncode == 0
    labels = root / "cifar10" / "test_y.npy"
    good = labels.read_bytes()
    stamp = labels.stat().st_mtime_ns
    assert zsharp(*args).returncode == 0 and labels.stat().st_mtime_ns == stamp  # sound
    labels.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size: only the digest tells
    result = zsharp(*args)
    assert result.returncode == 0, result.stderr
    assert "test_y.npy" in result.stderr and "preparing cifar10 again" in result.stderr
    assert labels.read_bytes() == good


@pytest.mark.slow  # a workflow run of its own (> 10 s)
def test_the_workflow_prepares_damaged_data_again_before_training(data_root, tmp_path) -> None:
    """A grid whose prepared digits were truncated since: the run prepares them again and
    trains on them; it never records a fault of the data as the cell's result."""
    root = own_data(data_root, tmp_path / "work" / "data")
    (root / "digits" / "train_y.npy").write_bytes(b"\x93NUMPY")  # a torn header
    config = tiny_config(optimizers={"sgd": {}}, data_root=str(root))
    path = write_config(tmp_path / "work", config)
    result = snakemake(tmp_path / "work", "--cores", "2", config=path)
    assert "train_y.npy" in result.stderr and "it is prepared again" in result.stderr
    summary = tmp_path / "work/results/tiny/cells/digits/resnet20/sgd/seed0/summary.json"
    assert json.loads(summary.read_text())["status"] == "ok"
    assert (root / "digits" / "READY").exists()


# --- 3. a grid too big to plan -----------------------------------------------------------------


@pytest.mark.slow
def test_a_huge_grid_is_refused_in_one_line_before_any_work(tmp_path: Path) -> None:
    """700,000 seeds (a 5 MB config): the dry run stops with the count of cells and the
    bound, naming the key, before any work; nothing is created. (Slow: Snakemake reads the
    YAML for some 20 s before the grid is counted in microseconds.)"""
    config = tiny_config(seeds=list(range(700_000)))
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(config, default_flow_style=True))
    result = snakemake(tmp_path, "-n", config=path, check=False, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    line = next(line for line in output.splitlines() if "max_cells" in line)
    assert "2,100,000 cells" in line and "(10,000)" in line, line
    assert not (tmp_path / "results").exists()


def test_max_cells_lets_a_bigger_grid_through(tmp_path: Path) -> None:
    from zsharp.pipeline.grid.expand import load_grid
    from zsharp.pipeline.grid.schema import GridError

    config = tiny_config(seeds=list(range(4)), max_cells=11)
    with pytest.raises(GridError, match=r"^max_cells: the grid has 12 cells .*\(11\)"):
        load_grid(config)
    assert len(load_grid({**config, "max_cells": 12}).cells) == 12
    sweep = tiny_config(seeds=[0], max_cells=4)
    sweep["optimizers"]["zsharp"]["sweep"] = {"percentile": [50, 90, 99]}
    with pytest.raises(GridError, match=r"5 optimizer entries"):  # a sweep counts its values
        load_grid(sweep)


def test_the_command_line_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zsharp", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
    )
    assert result.returncode == 0 and result.stdout.startswith("zsharp ")
