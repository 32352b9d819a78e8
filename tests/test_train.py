"""Training one cell through the real command line: outputs, resume, signals, NaN, W&B."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.workflow_helpers import CommandServer
from zsharp.pipeline.cell import checkpoint
from zsharp.pipeline.cell.config import Runtime, cell_config
from zsharp.pipeline.cell.progress import DIAGNOSTICS
from zsharp.pipeline.cli import main

DETERMINISTIC = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")
FIELDS = {*DETERMINISTIC, "epoch_seconds", "images_per_second"}
# A small, fast cell: ResNet-20 on the embedded digits, 3 epochs of ZSharp.
CELL = [
    "--dataset",
    "digits",
    "--model",
    "resnet20",
    "--optimizer",
    "zsharp",
    "--seed",
    "3",
    "--epochs",
    "3",
    "--batch-size",
    "128",
    "--opt",
    "rho=0.1",
]


def train_command(out: Path, data: Path, *args: str) -> list[str]:
    """`zsharp train ARGS --out OUT --data-root DATA`, run with this interpreter."""
    return [
        sys.executable,
        "-m",
        "zsharp",
        "train",
        *args,
        "--out",
        str(out),
        "--data-root",
        str(data),
    ]


def command(out: Path, data: Path, *extra: str) -> list[str]:
    """The small reference cell, on one thread, logging one line per epoch."""
    return train_command(out, data, *CELL, "--threads", "1", "--progress", "lines", *extra)


# `zsharp train` runs that go to their end are processes forked from the session's command
# server (conftest's `cli`): each a fresh process with its own environment and exit status,
# without importing torch again. Runs that a test signals mid-way are started as usual.
SERVER: list[CommandServer] = []


@pytest.fixture(scope="module", autouse=True)
def _command_server(cli: CommandServer) -> Iterator[None]:
    SERVER.append(cli)
    yield
    SERVER.remove(cli)


def run_command(
    cmd: list[str], environment: dict[str, str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``cmd`` (a :func:`train_command`) to its end, its output captured."""
    assert cmd[:3] == [sys.executable, "-m", "zsharp"], cmd
    return SERVER[-1].run(cmd[3:], env=environment, cwd=cwd, timeout=timeout)


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics (timings aside) and bit-identical final weights."""
    ma, mb = read_metrics(a), read_metrics(b)
    assert [{k: r[k] for k in DETERMINISTIC} for r in ma] == [
        {k: r[k] for k in DETERMINISTIC} for r in mb
    ]
    wa, wb = checkpoint.load(a / "model.pt"), checkpoint.load(b / "model.pt")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_root) -> Path:
    """The uninterrupted run every fault test is compared with."""
    out = tmp_path_factory.mktemp("reference")
    result = run_command(command(out, data_root), env(out), timeout=600)
    assert result.returncode == 0, result.stderr
    return out


def test_cell_outputs(reference_run: Path) -> None:
    records = read_metrics(reference_run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(set(r) == FIELDS | set(DIAGNOSTICS) for r in records)  # a SAM-family cell
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["config"]["optimizer"] == "zsharp"
    # the resolved configuration: the optimizer's registry defaults filled in
    assert summary["config"]["opt_args"] == {
        "rho": 0.1, "adaptive": False, "eta": 0.0, "percentile": 95.0, "variant": "paper"
    }  # fmt: skip
    assert summary["label"] == "zsharp" and summary["status"] == "ok"
    assert summary["final"]["test_acc"] == records[-1]["test_acc"]
    assert summary["best"]["test_acc"] == max(r["test_acc"] for r in records)
    weights = checkpoint.load(reference_run / "model.pt")  # weights_only=True
    assert any("running_mean" in k for k in weights)
    assert not (reference_run / "checkpoint.pt").exists()  # removed once finished


def test_rerun_of_a_finished_cell_is_identical(reference_run: Path, data_root, tmp_path) -> None:
    result = run_command(command(tmp_path, data_root), env(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr
    assert_same_run(reference_run, tmp_path)


def wait_for(predicate, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


@pytest.mark.parametrize("moment", ["before the first checkpoint", "mid epoch 2", "epoch 3"])
def test_sigkill_then_rerun_is_bit_identical(
    moment: str, reference_run, data_root, tmp_path
) -> None:
    ckpt = tmp_path / "checkpoint.pt"
    process = subprocess.Popen(
        command(tmp_path, data_root),
        env=env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if moment == "before the first checkpoint":
        wait_for(lambda: (tmp_path / "metrics.jsonl").exists() is False and process.poll() is None)
        time.sleep(1.5)
    elif moment == "mid epoch 2":
        wait_for(ckpt.exists)
        time.sleep(0.5)
    else:
        wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(read_metrics(tmp_path)) >= 2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (tmp_path / "summary.json").exists()
    result = run_command(command(tmp_path, data_root), env(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr
    assert_same_run(reference_run, tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_mid_epoch_and_resumes(
    signum, reference_run, data_root, tmp_path
) -> None:
    process = subprocess.Popen(
        command(tmp_path, data_root),
        env=env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for((tmp_path / "checkpoint.pt").exists)  # epoch 1 done: now inside epoch 2
    time.sleep(0.3)
    sent = time.monotonic()
    process.send_signal(signum)
    code = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert code == 3, stderr
    assert time.monotonic() - sent < 30
    assert signal.Signals(signum).name in stderr
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["batch"] > 0) in {(1, True), (2, False), (2, True)}
    result = run_command(command(tmp_path, data_root), env(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr
    assert_same_run(reference_run, tmp_path)


def test_nonfinite_loss_stops_with_epoch_and_step(data_root, tmp_path) -> None:
    cmd = train_command(
        tmp_path, data_root, "--dataset", "digits", "--model", "resnet20", "--optimizer", "sgd",
        "--lr", "1e6", "--momentum", "0", "--epochs", "2", "--schedule", "constant",
    )  # fmt: skip
    result = run_command(cmd, env(tmp_path), timeout=300)
    assert result.returncode == 4, result.stderr
    assert "non-finite training loss at epoch 1, step" in result.stderr
    assert not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "model.pt").exists()


def test_nonfinite_loss_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch) -> None:
    """Divergence in epoch 2: the checkpoint of epoch 1 stays as it was."""
    from zsharp.pipeline.cell import train, trainer

    original = trainer.CellTrainer.save_checkpoint

    def save_then_diverge(self):
        original(self)
        if self.progress.epoch == 1:  # after the epoch-1 checkpoint: the weights blow up
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(trainer.CellTrainer, "save_checkpoint", save_then_diverge)
    cfg = cell_config("digits", "resnet20", "sgd", epochs=3, batch_size=256)
    rt = Runtime(out=tmp_path, data_root=data_root, wandb_mode="disabled", threads=1)
    with pytest.raises(trainer.NonFiniteLossError, match="epoch 2, step 1 "):
        train.train_cell(cfg, rt)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--optimizer", "zsharpp"], "optimizer"),
        (["--opt", "rhoo=0.1"], "rhoo"),
        (["--opt", "percentile=100"], "percentile"),
        (["--model", "resnet21"], "model"),
        (["--dataset", "cifar11"], "dataset"),
        (["--model-arg", "patch_size=3", "--model", "vit"], "patch_size"),
        (["--epochs", "0"], "epochs"),
        (["--lr", "-1"], "lr"),
        (["--schedule", "linear"], "schedule"),
        (["--wandb-mode", "online", "--device", "cuda:7"], "device"),
        (["--micro-batches", "0"], "micro_batches"),
        (["--micro-batches", "65"], "micro_batches"),  # digits' batch: 64 images
        (["--micro-batches", "30"], "micro_batches"),  # its last batch: 1437 % 64 = 29
        (["--max-grad-norm", "0"], "max_grad_norm"),
    ],
)
def test_bad_input_fails_fast_naming_the_key(args, key, tmp_path, capsys) -> None:
    base = {"--dataset": "digits", "--model": "resnet20", "--optimizer": "sgd"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = [
        "train",
        *[x for kv in base.items() for x in kv if kv[0] not in ("--opt", "--model-arg")],
    ]
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in ("--opt", "--model-arg"):
            argv += [flag, value]
    out = tmp_path / "cell"
    code = main([*argv, "--out", str(out), "--data-root", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and key in err
    assert not out.exists() or not any(out.iterdir())


def test_missing_dataset_names_the_download_command(tmp_path, capsys) -> None:
    code = main(
        [
            "train",
            "--dataset",
            "cifar10",
            "--model",
            "resnet20",
            "--optimizer",
            "sgd",
            "--out",
            str(tmp_path / "cell"),
            "--data-root",
            str(tmp_path / "data"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "zsharp download cifar10" in err


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline run, read back by wandb's own reader."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    result = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(files[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_run_has_curves_and_config_and_no_api_key(data_root, tmp_path) -> None:
    secret = "zsharp-test-key-0123456789abcdef0123456789abcdef01234567"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    environment |= {"WANDB_API_KEY": secret, "PYTHONUNBUFFERED": "1"}
    cmd = train_command(
        tmp_path, data_root, "--dataset", "digits", "--model", "resnet20", "--optimizer", "fsam",
        "--seed", "1", "--epochs", "2", "--batch-size", "256", "--wandb-project", "zsharp-tests",
    )  # fmt: skip
    result = run_command(cmd, environment, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = wandb_records(tmp_path)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["project"] == "zsharp-tests"
    assert run["run_group"] == "digits-resnet20"
    assert run["display_name"] == "fsam-seed1"
    assert run["job_type"] == "train"
    config = run["config"]["update"]
    assert config["optimizer"] == "fsam" and config["seed"] == 1 and config["epochs"] == 2
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    metrics = read_metrics(tmp_path)
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["test_acc"] for h in history] == pytest.approx([m["test_acc"] for m in metrics])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["wandb_run_id"] == run["run_id"]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr


def test_evaluate_cell(reference_run: Path, data_root) -> None:
    code = main(
        [
            "evaluate",
            "--cell",
            str(reference_run),
            "--data-root",
            str(data_root),
            "--hessian-samples",
            "256",
            "--hessian-iterations",
            "8",
            "--wandb-mode",
            "disabled",
        ]
    )
    assert code == 0
    result = json.loads((reference_run / "eval.json").read_text())
    final = read_metrics(reference_run)[-1]
    assert result["test_acc"] == pytest.approx(final["test_acc"], abs=1e-9)
    assert result["test_loss"] == pytest.approx(final["test_loss"], rel=1e-5)
    assert 0.0 <= result["ece"] <= 1.0
    assert result["sharpness"] > 0
    assert result["hessian_samples"] == 256
    assert 1 <= result["hessian_vector_products"] <= 8


def test_evaluate_unfinished_cell_names_the_file(tmp_path, capsys) -> None:
    assert main(["evaluate", "--cell", str(tmp_path)]) == 2
    assert "summary.json" in capsys.readouterr().err


@pytest.mark.slow
def test_digits_defaults_pass_90_percent(data_root, tmp_path) -> None:
    """The issue's acceptance run: `zsharp train --dataset digits --model resnet20
    --optimizer zsharp` with the digits defaults (15 epochs, about a minute on 2 cores)."""
    cmd = train_command(
        tmp_path, data_root, "--dataset", "digits", "--model", "resnet20", "--optimizer", "zsharp"
    )
    result = run_command(cmd, env(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["test_acc"] >= 0.90


def test_download_command_verifies_the_checksum(tmp_path, capsys) -> None:
    """`zsharp download` on a CIFAR-10 archive in the upstream format: the published md5
    rejects it (one line naming the file, nothing ready); --no-verify prepares it."""
    from tests.archives import make_archive

    archive = make_archive("cifar10", tmp_path / "mirror")
    root = tmp_path / "data"
    code = main(["download", "cifar10", "--root", str(root), "--source", str(archive.path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cifar-10-python.tar.gz" in err
    assert not (root / "cifar10" / "READY").exists()
    code = main(
        ["download", "cifar10", "--root", str(root), "--source", str(archive.path), "--no-verify"]
    )
    assert code == 0 and (root / "cifar10" / "READY").exists()


def test_option_values_read_like_yaml_numbers(tmp_path) -> None:
    from zsharp.pipeline.cli import build_parser

    args = build_parser().parse_args(
        [
            "train",
            "--dataset",
            "digits",
            "--model",
            "resnet20",
            "--optimizer",
            "zsharp",
            "--out",
            str(tmp_path),
            "--opt",
            "rho=5e-2",
            "--opt",
            "variant=official",
            "--opt",
            "adaptive=true",
            "--lr",
            "1e-3",
        ]
    )
    assert dict(args.opt_args) == {"rho": 0.05, "variant": "official", "adaptive": True}
    assert args.lr == 0.001


def test_aggregate_names_cells_outside_the_workflow_layout(reference_run, tmp_path) -> None:
    """Any directory holding a cell works: it is named by its configuration."""
    import shutil

    cell = tmp_path / "my-run"
    shutil.copytree(reference_run, cell)
    assert (
        main(["aggregate", str(cell), "--out", str(tmp_path / "table"), "--wandb-mode", "disabled"])
        == 0
    )
    seeds = (tmp_path / "table" / "seeds.csv").read_text()
    assert "digits,resnet20,zsharp,3," in seeds


@pytest.mark.parametrize("k", [1, 3])
def test_sam_interval_makes_every_kth_step_two_pass(data_root, tmp_path, k: int) -> None:
    """Forward passes over one epoch of n steps: n + ⌈n/k⌉ (count with a hook)."""
    from zsharp.pipeline.cell.trainer import CellTrainer, StopSignals

    cfg = cell_config(
        "digits", "resnet20", "zsharp", epochs=1, batch_size=256, sam_interval=k, deep=False
    )
    trainer = CellTrainer(cfg, Runtime(out=tmp_path, data_root=data_root, threads=1))
    calls = []
    trainer.model.register_forward_hook(lambda *_: calls.append(1))
    with StopSignals() as stop:
        trainer.train_epoch(stop, None)
    n = len(trainer.train_batches)
    assert n > k and len(calls) == n + -(-n // k)
