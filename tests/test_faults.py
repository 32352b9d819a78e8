"""Faults are not results: transient faults retry, bad input never reaches a job, a cell is
one consistent unit. Each class of fault of issue 10, through the real command line (and the
real `snakemake`): a network namespace or a port that never answers for W&B, a small tmpfs
for a full disk (root only; skipped with the reason elsewhere). Bounded waits are checked by
event (it finished, it said why), never by timing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.workflow_helpers import CommandServer, snakemake, tiny_config, write_config
from zsharp.atomic import LOCK_NAME
from zsharp.pipeline.cell import checkpoint

# the smallest real cell: ResNet-20 on the embedded digits, one epoch of SGD
CELL = ["--dataset", "digits", "--model", "resnet20", "--optimizer", "sgd", "--seed", "1",
        "--epochs", "1", "--batch-size", "256", "--threads", "1",
        "--progress", "lines"]  # fmt: skip
DETERMINISTIC = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


def zsharp(*args: str) -> list[str]:
    return [sys.executable, "-m", "zsharp", *args]


# `python -m zsharp …` commands run as processes forked from the session's command
# server (conftest's `cli`): each one a fresh process with its own environment, umask and
# exit status, without importing torch again (a few seconds each, some 30 commands here).
SERVER: list[CommandServer] = []


@pytest.fixture(scope="module", autouse=True)
def _command_server(cli: CommandServer) -> Iterator[None]:
    SERVER.append(cli)
    yield
    SERVER.remove(cli)


def run(
    command: list[str], env: dict[str, str] | None = None, umask: int | None = None, **kwargs
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
    if command[:3] == zsharp() and SERVER and not kwargs:
        return SERVER[-1].run(command[3:], env=environment, umask=umask)
    return subprocess.run(
        command,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
        **kwargs,
    )


def train(out: Path, data: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return run(
        zsharp("train", *CELL, "--out", str(out), "--data-root", str(data), *extra), **kwargs
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The error output, asserted to be one line (no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def deterministic(cell: Path) -> list[dict]:
    records = [json.loads(x) for x in (cell / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in DETERMINISTIC} for r in records]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = checkpoint.load(a / "model.pt"), checkpoint.load(b / "model.pt")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def finished_cell(tmp_path_factory, data_root) -> Path:
    """A cell trained once, uninterrupted (umask 022)."""
    out = tmp_path_factory.mktemp("finished") / "cell"
    result = train(out, data_root, umask=0o022)
    assert result.returncode == 0, result.stderr
    return out


def copy_cell(cell: Path, where: Path) -> Path:
    shutil.copytree(cell, where)
    return where


# --- helpers for the environment: tmpfs, network namespace, a silent server -----------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at ``path`` (root only), read-only after it is filled if asked."""
    if os.geteuid() != 0:
        pytest.skip("a full or read-only disk is simulated with a tmpfs, which needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def network_namespace() -> list[str]:
    """`unshare -n`: a command prefix giving a network with only loopback (down)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a network namespace needs root and unshare")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -n is not allowed here: {probe.stderr.strip()}")
    return ["unshare", "-n"]


@contextlib.contextmanager
def server(kind: str) -> Iterator[str]:
    """A local W&B "server": ``silent`` accepts connections and never answers; ``reject``
    answers every request with 401 (a bad API key). Yields its base URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            if kind == "silent":
                held.append(connection)
                continue
            connection.settimeout(2)
            with contextlib.suppress(OSError):
                connection.recv(65536)
                body = b'{"errors": [{"message": "invalid api key"}]}'
                connection.sendall(
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in held:
            connection.close()
        listener.close()


def wandb_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An online W&B setup with a key that no server will take, a 3 s budget."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        **environment,
        "HOME": str(home),
        "WANDB_API_KEY": FAKE_KEY,
        "ZSHARP_WANDB_TIMEOUT": "3",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def assert_trained_offline(out: Path, result: subprocess.CompletedProcess[str]) -> None:
    """It finished, said why in one warning line, and kept a syncable offline run."""
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "ok"
    warnings = [line for line in result.stderr.splitlines() if "W&B" in line]
    assert len(warnings) == 1, result.stderr
    assert "continuing offline" in warnings[0] and "wandb sync" in warnings[0]
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), list(out.rglob("*"))


# --- 1. a transient fault is retried, never a kept result ----------------------------------


def test_wandb_online_without_network_trains_offline(data_root, tmp_path) -> None:
    """`WANDB_MODE=online` in a network namespace: one warning, the run goes on offline."""
    prefix = network_namespace()
    out = tmp_path / "cell"
    command = [*prefix, *zsharp("train", *CELL, "--out", str(out), "--data-root", str(data_root))]
    result = subprocess.run(
        command,
        env=wandb_env(tmp_path, WANDB_MODE="online"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_trained_offline(out, result)


@pytest.mark.parametrize("kind", ["silent", "reject"])
def test_wandb_server_that_never_answers_or_rejects_the_key(kind, data_root, tmp_path) -> None:
    """A server that accepts and never answers, or one that refuses the key: same outcome."""
    out = tmp_path / "cell"
    with server(kind) as url:
        result = train(
            out, data_root, "--wandb-mode", "online", env=wandb_env(tmp_path, WANDB_BASE_URL=url)
        )
    assert_trained_offline(out, result)


@pytest.mark.slow  # waits out W&B's service timeout (> 10 s)
def test_wandb_service_that_never_starts_costs_a_warning(data_root, tmp_path) -> None:
    """wandb's service process never comes up: training goes on without W&B."""
    core = tmp_path / "wandb-core"
    core.write_text("#!/bin/sh\nexec sleep 8\n")
    core.chmod(0o755)
    out = tmp_path / "cell"
    script = (
        "import sys\n"
        "import wandb.sdk.lib.service.service_process as process\n"
        f"process.get_core_path = lambda: {str(core)!r}\n"
        "from zsharp.pipeline.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["train", *CELL, "--out", str(out), "--data-root", str(data_root)]
    result = run(
        [sys.executable, "-c", script, *argv], env=wandb_env(tmp_path, WANDB_MODE="offline")
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "W&B" in line]
    assert len(warnings) == 1 and "continues without W&B" in warnings[0], result.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "ok"


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_corrupt_checkpoint_is_set_aside_and_the_cell_restarts(
    damage, finished_cell, data_root, tmp_path
) -> None:
    out = tmp_path / "cell"
    out.mkdir()
    good = tmp_path / "good.pt"
    # a real checkpoint of this cell, then damaged
    state = {"format": 1, "model": checkpoint.load(finished_cell / "model.pt")}
    checkpoint.save(good, state)
    blob = good.read_bytes()
    damaged = blob[: len(blob) // 2] if damage == "truncated" else os.urandom(len(blob))
    (out / "checkpoint.pt").write_bytes(damaged)
    result = train(out, data_root)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "checkpoint.pt" in line]
    assert len(warnings) == 1 and "set aside" in warnings[0], result.stderr
    aside = list(out.glob("checkpoint.pt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    assert str(aside[0].name) in warnings[0]
    # restarted cleanly: the same run as one that never saw the damaged file
    assert deterministic(out) == deterministic(finished_cell)
    assert_same_weights(out, finished_cell)


def test_only_a_deterministic_failure_is_recorded(data_root, tmp_path) -> None:
    """An I/O error (the checkpoint's path is a folder) fails every attempt but the last,
    which records a placeholder marked transient; a divergence is recorded at once."""
    out = tmp_path / "cell"
    (out / "checkpoint.pt").mkdir(parents=True)
    first = train(out, data_root, "--record-failure", "--attempt", "1", "2")
    assert first.returncode == 5, first.stderr
    assert "checkpoint.pt" in one_line(first) and "Errno" in first.stderr
    assert not (out / "summary.json").exists()
    last = train(out, data_root, "--record-failure", "--attempt", "2", "2")
    assert last.returncode == 0, last.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["transient"] is True
    assert "checkpoint.pt" in summary["error"]
    diverged = tmp_path / "diverged"
    result = train(
        diverged, data_root, "--lr", "1e6", "--momentum", "0", "--schedule", "constant",
        "--record-failure", "--attempt", "1", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((diverged / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["transient"] is False
    assert "non-finite" in summary["error"]


def test_out_of_memory_is_transient(data_root, tmp_path, monkeypatch, capsys) -> None:
    """CUDA's OutOfMemoryError (a RuntimeError) is a transient fault: exit 5, one line,
    and only the last attempt writes it down, marked transient."""
    from zsharp.pipeline.cell import trainer as train_module
    from zsharp.pipeline.cli import main

    def out_of_memory(self, x, y, share=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module.CellTrainer, "step", out_of_memory)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "cell"
    argv = ["train", *CELL, "--out", str(out), "--data-root", str(data_root), "--record-failure"]
    assert main([*argv, "--attempt", "1", "2"]) == 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory" in err, err
    assert not (out / "summary.json").exists()
    assert main([*argv, "--attempt", "2", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transient"] is True and "OutOfMemoryError" in summary["error"]


@pytest.mark.slow
def test_workflow_retries_a_transient_fault_and_the_table_says_why(tmp_path) -> None:
    """The last attempt's transient fault shows as MISSING (with its reason); the next
    `snakemake` run retries the cell without any flag; a finished grid then stays put."""
    config = tiny_config(optimizers={"sgd": {}})
    config["resources"]["train"]["retries"] = 1
    path = write_config(tmp_path, config)
    cell = tmp_path / "results/tiny/cells/digits/resnet20/sgd/seed0"
    (cell / "checkpoint.pt").mkdir(parents=True)  # an I/O error on every attempt
    dry = snakemake(tmp_path, "-n", config=path)  # says first where it writes and reads
    results, data = (tmp_path / "results/tiny").resolve(), (tmp_path / "data").resolve()
    assert dry.stderr.splitlines()[0] == f"zsharp: results in {results}, data in {data}"
    first = snakemake(tmp_path, "--cores", "2", config=path)
    output = first.stdout + first.stderr
    table = pd.read_csv(tmp_path / "results/tiny/results.csv").set_index("optimizer")
    assert table.loc["sgd", "missing"] == 1 and table.loc["sgd", "failed"] == 0
    markdown = (tmp_path / "results/tiny/results.md").read_text()
    assert "MISSING" in markdown and "checkpoint.pt" in markdown
    assert "1 cell(s) have no result" in output
    (cell / "checkpoint.pt").rmdir()  # the fault goes away
    second = snakemake(tmp_path, "--cores", "2", config=path)  # no flag
    assert "Nothing to be done" not in second.stdout + second.stderr
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["status"] == "ok"
    table = pd.read_csv(tmp_path / "results/tiny/results.csv").set_index("optimizer")
    assert table.loc["sgd", "missing"] == 0 and table.loc["sgd", "failed"] == 0
    third = snakemake(tmp_path, "--cores", "2", config=path)
    assert "Nothing to be done" in third.stdout + third.stderr


# --- 2. a cell is one consistent unit ------------------------------------------------------


HOLD = (
    "import sys, time\n"
    "from zsharp.atomic import DirectoryLock\n"
    "with DirectoryLock(sys.argv[1], 'holder'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


@contextlib.contextmanager
def holder(cell: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(cell)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)


def test_second_process_on_a_cell_exits_2_naming_the_holder(
    finished_cell, data_root, tmp_path
) -> None:
    out = copy_cell(finished_cell, tmp_path / "cell")
    with holder(out) as process:
        result = train(out, data_root)
        assert result.returncode == 2, result.stderr
        line = one_line(result)
        assert f"pid {process.pid}" in line and "host" in line and str(out) in line
        evaluation = run(zsharp("evaluate", "--cell", str(out), "--data-root", str(data_root)))
        assert evaluation.returncode == 2 and f"pid {process.pid}" in one_line(evaluation)
        assert (out / "summary.json").exists() and not (out / "eval.json").exists()
        process.send_signal(signal.SIGKILL)  # dies holding it: the kernel frees the lock
        process.wait(timeout=60)
    # the next run owns the cell, and its files follow the umask
    result = train(out, data_root, umask=0o027)
    assert result.returncode == 0, result.stderr
    for name in ("summary.json", "metrics.jsonl", "model.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name
    assert not (out / LOCK_NAME).exists()


def test_retrain_removes_the_previous_results_first(finished_cell, data_root, tmp_path) -> None:
    """A retrain into a finished cell, killed after its first epoch, leaves its own metrics
    and no summary: nothing of the earlier run describes them."""
    out = copy_cell(finished_cell, tmp_path / "cell")
    (out / "eval.json").write_text('{"status": "ok"}\n')
    old_metrics = (out / "metrics.jsonl").stat().st_mtime_ns
    command = zsharp("train", *CELL, "--epochs", "3", "--out", str(out), "--data-root",
                     str(data_root))  # fmt: skip
    process = subprocess.Popen(
        command,
        env={**os.environ, "WANDB_MODE": "disabled"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        checkpoint_file = out / "checkpoint.pt"
        deadline = time.monotonic() + 300
        while not checkpoint_file.exists():  # epoch 1 of the retrain is done
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait(timeout=60)
    for name in ("summary.json", "model.pt", "eval.json"):
        assert not (out / name).exists(), name
    # the metrics beside it are the retrain's own (copytree kept the old file's time)
    assert (out / "metrics.jsonl").stat().st_mtime_ns > old_metrics


def test_finished_cell_files_follow_the_umask(finished_cell) -> None:
    for name in ("summary.json", "metrics.jsonl", "model.pt"):
        assert (finished_cell / name).stat().st_mode & 0o777 == 0o644, name


# --- 3. a full disk ------------------------------------------------------------------------


def test_download_on_a_full_disk_says_so_and_leaves_no_temp_file(tmp_path) -> None:
    root = tmp_path / "small"
    with tmpfs(root, "48k"):
        result = run(zsharp("download", "digits", "--root", str(root)))
        assert result.returncode == 5, (result.returncode, result.stderr)
        line = one_line(result)
        assert "No space left on device" in line and "Errno 28" in line and str(root) in line
        assert not list(root.rglob("*.tmp")) and not list(root.rglob(".downloads-*"))
        assert not list(root.rglob("READY"))


def test_stale_download_temp_files_are_cleaned(tmp_path) -> None:
    directory = tmp_path / "data" / "digits"
    directory.mkdir(parents=True)
    stale = [directory / ".train_x.npy.999999.tmp", directory / ".downloads-999999"]
    stale[0].write_bytes(b"\0" * 100)
    stale[1].mkdir()
    result = run(zsharp("download", "digits", "--root", str(tmp_path / "data")))
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in stale)
    assert (directory / "READY").exists()


def test_training_on_a_full_disk_names_the_file_and_errno(data_root, tmp_path) -> None:
    out = tmp_path / "small"
    with tmpfs(out, "600k"):  # metrics fit, the 2.2 MB checkpoint does not
        result = train(out, data_root)
        assert result.returncode == 5, result.stderr
        line = one_line(result)
        assert "Errno 28" in line and str(out / "checkpoint.pt") in line
        assert not list(out.glob(".*.tmp"))
        assert not (out / "summary.json").exists()


def test_stale_temp_files_are_cleaned_by_the_next_run_of_the_step(
    finished_cell, data_root, tmp_path
) -> None:
    table = tmp_path / "table"
    table.mkdir()
    left = [table / ".results.md.k1ll3d.tmp", table / ".seeds.csv.x.tmp"]
    for path in left:
        path.write_text("half")
    result = run(zsharp("aggregate", str(finished_cell), "--out", str(table)))
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in left)
    assert (table / "results.md").exists()
    out = copy_cell(finished_cell, tmp_path / "cell")
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    result = run(zsharp("evaluate", "--cell", str(out), "--hessian-samples", "16",
                        "--hessian-iterations", "1", "--data-root", str(data_root)))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (out / ".checkpoint.pt.abc123.tmp").exists()


# --- 4. writes only where the user said ---------------------------------------------------


@pytest.mark.parametrize("where", ["root", "home", "not a cell", "a file"])
def test_out_refuses_places_that_are_not_for_a_cell(where, data_root, tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    out = {
        "root": Path("/"),
        "home": home,
        "not a cell": home,
        "a file": home / "notes.txt",
    }[where]
    env = {"HOME": str(home if where != "not a cell" else tmp_path)}
    folder = out if out.is_dir() else out.parent
    before = sorted(folder.iterdir())
    result = train(out, data_root, env=env)
    assert result.returncode == 2, result.stderr
    assert str(out) in one_line(result)
    assert sorted(folder.iterdir()) == before


def test_read_only_out_is_one_line(data_root, tmp_path) -> None:
    out = tmp_path / "ro"
    with tmpfs(out, "64k"):
        remount_read_only(out)
        result = train(out, data_root)
        assert result.returncode == 2, result.stderr
        assert "Read-only file system" in one_line(result)


# --- 6. bad input is one line, exit 2 ------------------------------------------------------


def test_evaluate_bad_cells_are_one_line_naming_the_file(finished_cell, tmp_path) -> None:
    truncated = copy_cell(finished_cell, tmp_path / "truncated")
    weights = (truncated / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(weights[: len(weights) // 3])
    invalid = copy_cell(finished_cell, tmp_path / "invalid")
    (invalid / "summary.json").write_text('{"status": "ok", "config": ')
    no_config = copy_cell(finished_cell, tmp_path / "no-config")
    (no_config / "summary.json").write_text('{"status": "ok"}')
    cases = [(truncated, "model.pt"), (invalid, "summary.json"), (no_config, "summary.json")]
    for cell, name in cases:
        result = run(zsharp("evaluate", "--cell", str(cell), "--data-root", str(tmp_path)))
        assert result.returncode == 2, result.stderr
        assert str(cell / name) in one_line(result)


def test_aggregate_of_an_empty_folder_is_one_line(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(zsharp("aggregate", str(empty), "--out", str(tmp_path / "table")))
    assert result.returncode == 2, result.stderr
    assert str(empty) in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr


def test_aggregate_skips_a_corrupt_cell_and_marks_it(finished_cell, tmp_path) -> None:
    cells = tmp_path / "results/x/cells/digits/resnet20/sgd"
    good = copy_cell(finished_cell, cells / "seed1")
    bad = copy_cell(finished_cell, cells / "seed2")
    (bad / "summary.json").write_text("{ not json")
    out = tmp_path / "table"
    result = run(zsharp("aggregate", str(good), str(bad), "--out", str(out)))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(bad / "summary.json") in warnings[0]
    table = pd.read_csv(out / "results.csv")
    assert list(table["seeds"]) == [2] and list(table["missing"]) == [1]
    markdown = (out / "results.md").read_text()
    assert "MISSING 1/2" in markdown and "seed2" in markdown and "not valid JSON" in markdown
