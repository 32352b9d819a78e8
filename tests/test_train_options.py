"""The trainer's options: per-epoch filter diagnostics, accumulation and clipping through
the library's step, and its CUDA-graph step (``graphs``)."""

from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from tests import reference
from zsharp.optim import create
from zsharp.optim.step import SharpnessAwareStep
from zsharp.pipeline.cell.config import Runtime, cell_config
from zsharp.pipeline.cell.progress import DIAGNOSTICS
from zsharp.pipeline.cell.train import train_cell
from zsharp.pipeline.cell.trainer import CellTrainer, StopSignals
from zsharp.pipeline.cli import main


def trainer(
    data_root: Path, out: Path, optimizer: str = "zsharp", model: str = "resnet20", **settings: Any
) -> CellTrainer:
    settings = {"epochs": 1, "batch_size": 256, **settings}
    model = "vit" if "model_args" in settings else model
    cfg = cell_config("digits", model, optimizer, deep=False, **settings)
    return CellTrainer(cfg, Runtime(out=out, data_root=data_root, threads=1))


def test_epoch_diagnostics_are_the_means_of_the_steps(data_root: Path, tmp_path: Path) -> None:
    """Each step's ‖g‖, ‖ε‖, kept fraction and cosine recomputed in float64 from the
    gradient the optimizer saw (the paper's rule, written independently in
    tests/reference.py), the losses at w and w + ε from the model: their means are the
    epoch's record."""
    t = trainer(data_root, tmp_path, opt_args={"rho": 0.07, "percentile": 90.0})
    seen: list[list[float]] = []
    first_step = t.optimizer.first_step

    def watched(*args: Any, **kwargs: Any) -> Any:
        params = [p for g in t.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad.detach().double().numpy().copy() for p in params]
        weights = [p.detach().double().numpy().copy() for p in params]
        d = reference.diagnostics(
            grads, grads, weights, [0.07] * len(grads), variant="paper", percentile=90.0
        )
        seen.append([d["grad_norm"], d["epsilon_norm"], d["kept_fraction"], d["cosine"]])
        return first_step(*args, **kwargs)

    t.optimizer.first_step = watched  # type: ignore[method-assign]
    losses: list[tuple[float, float]] = []
    loss_fn = t._loss_fn

    def watched_loss(logits: torch.Tensor, y: torch.Tensor) -> Any:
        loss = loss_fn(logits, y)
        losses.append((float(loss.detach()), float(F.cross_entropy(logits.detach().double(), y))))
        return loss

    t._loss_fn = watched_loss
    with StopSignals() as stop:
        t.train_epoch(stop, None)
    record = t.finish_epoch()
    n = len(seen)
    assert n == len(t.train_batches) and len(losses) == 2 * n
    at_w = [losses[2 * i][1] for i in range(n)]
    at_eps = [losses[2 * i + 1][1] for i in range(n)]
    expected = [sum(column) / n for column in zip(*seen, strict=True)]
    expected += [sum(at_w) / n, sum(at_eps) / n, (sum(at_eps) - sum(at_w)) / n]
    for name, value in zip(DIAGNOSTICS, expected, strict=True):
        assert record[name] == pytest.approx(value, rel=2e-5, abs=1e-6), name
    assert record["epsilon_norm"] == pytest.approx(0.07, rel=1e-5)  # ‖ε‖ = ρ (paper)
    assert 0 <= record["ascent_cosine"] <= 1 and 0 < record["kept_fraction"] < 0.2


def test_base_optimizers_record_no_diagnostics(data_root: Path, tmp_path: Path) -> None:
    t = trainer(data_root, tmp_path, optimizer="sgd")
    with StopSignals() as stop:
        t.train_epoch(stop, None)
    assert not set(DIAGNOSTICS) & set(t.finish_epoch())


def test_graphs_step_equals_eager_on_cpu(data_root: Path, tmp_path: Path) -> None:
    """``graphs`` on a CPU runs the same step uncaptured, with the graph-ready optimizer
    (fused SGD, a float32 learning-rate tensor): equal to eager to float tolerance, and the
    summary says so. (The captured path needs a CUDA device: tests/test_graphs.py.)"""
    cfg = cell_config("digits", "resnet20", "zsharp", epochs=2, batch_size=256, sam_interval=2)
    summaries = {}
    for graphs in (False, True):
        rt = Runtime(out=tmp_path / str(graphs), data_root=data_root, threads=1, graphs=graphs,
                     wandb_mode="disabled")  # fmt: skip
        summaries[graphs] = train_cell(cfg, rt)
    eager, graphed = summaries[False], summaries[True]
    assert (eager["graphs"], graphed["graphs"]) == (False, True)
    for key in ("train_loss", "test_loss", "grad_norm", "sam_sharpness"):
        assert graphed["final"][key] == pytest.approx(eager["final"][key], rel=1e-4), key
    records = {
        graphs: [json.loads(line) for line in (tmp_path / str(graphs) / "metrics.jsonl").open()]
        for graphs in (False, True)
    }
    # the learning rate, a float32 tensor in the optimizer, is recorded as a number
    assert [r["lr"] for r in records[True]] == pytest.approx([r["lr"] for r in records[False]])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precision", "fp16"], "graphs: fp16 with a GradScaler cannot be captured"),
        (["--compile"], "graphs: torch.compile and CUDA graphs together"),
        (["--model", "vit", "--model-arg", "dropout=0.1"], "graphs: module"),
    ],
)
def test_graphs_refusals_name_the_key(
    extra: list[str], message: str, data_root: Path, tmp_path: Path, capsys: Any
) -> None:
    args = ["train", "--dataset", "digits", "--model", "resnet20", "--optimizer", "zsharp"]
    args += ["--epochs", "1", "--out", str(tmp_path / "c"), "--data-root", str(data_root)]
    code = main([*args, "--graphs", "--wandb-mode", "disabled", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


def test_graphs_resume_from_a_checkpoint_is_bit_identical(data_root: Path, tmp_path: Path) -> None:
    """A checkpoint's learning-rate tensor and optimizer state replace the ones a graph was
    made with: the graphs are dropped and made again, and the run goes on as if never
    interrupted."""
    cfg = cell_config("digits", "resnet20", "zsharp", deep=False, epochs=3, batch_size=256,
                      sam_interval=2)  # fmt: skip

    def make() -> CellTrainer:
        rt = Runtime(out=tmp_path, data_root=data_root, threads=1, graphs=True)
        return CellTrainer(cfg, rt)

    first = make()
    with StopSignals() as stop:
        first.train_epoch(stop, None)
        first.finish_epoch()
        first.save_checkpoint()
        first.train_epoch(stop, None)
        uninterrupted = first.finish_epoch()
    resumed = make()
    assert resumed.try_resume()
    with StopSignals() as stop:
        resumed.train_epoch(stop, None)
        again = resumed.finish_epoch()
    for key in ("train_loss", "train_acc", "test_acc", "grad_norm", "sam_sharpness"):
        assert again[key] == uninterrupted[key], key
    for a, b in zip(first.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


TINY_VIT = {"depth": 1, "hidden": 32, "heads": 2, "mlp_hidden": 32}


def test_micro_batches_equal_the_whole_batch(data_root: Path, tmp_path: Path) -> None:
    """A cell's ``micro_batches`` accumulates to its whole-batch step (a LayerNorm model:
    no batch statistics), through an epoch of the trainer (SAM: ε is continuous in g, so
    float32 rounding stays rounding)."""
    runs = []
    for k in (1, 3):
        t = trainer(data_root, tmp_path / f"k{k}", "sam", model_args=TINY_VIT, micro_batches=k)
        with StopSignals() as stop:
            t.train_epoch(stop, None)
        runs.append((t.finish_epoch(), [p.detach().clone() for p in t.model.parameters()]))
    (one, w1), (three, w3) = runs
    for a, b in zip(w1, w3, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert one["train_loss"] == pytest.approx(three["train_loss"], rel=1e-5)
    assert one["train_acc"] == three["train_acc"]


def test_max_grad_norm_reaches_the_step(data_root: Path, tmp_path: Path) -> None:
    """A cell's ``max_grad_norm`` clips its descent gradient: the trainer's first step equals
    the library's SharpnessAwareStep with the same clipping (tested against float64 in
    tests/test_step.py), and differs from the unclipped step."""
    t = trainer(data_root, tmp_path / "cell", model_args=TINY_VIT, max_grad_norm=0.05)
    twin = copy.deepcopy(t.model)
    opt = create("zsharp", twin.parameters(), **t.cfg.optimizer_kwargs())
    x, y = next(iter(t.train_batches.batches()))
    t.step(x, y)
    SharpnessAwareStep(twin, opt, F.cross_entropy, max_grad_norm=0.05)(x, y)
    for a, b in zip(t.model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    free = trainer(data_root, tmp_path / "free", model_args=TINY_VIT)
    free.step(x, y)
    moved = [
        (a - b).abs().max() for a, b in zip(free.model.parameters(), twin.parameters(), strict=True)
    ]
    assert max(float(m) for m in moved) > 1e-4


def test_evaluate_a_vit_cell(data_root: Path, tmp_path: Path) -> None:
    """The Hessian's power iteration differentiates attention twice: the fused attention
    kernels cannot, so it runs in the math kernel, and a ViT cell evaluates."""
    cfg = cell_config("digits", "vit", "zsharp", epochs=1, batch_size=256, model_args=TINY_VIT)
    train_cell(cfg, Runtime(out=tmp_path, data_root=data_root, threads=1, wandb_mode="disabled"))
    args = ["evaluate", "--cell", str(tmp_path), "--data-root", str(data_root), "--wandb-mode"]
    args.append("disabled")  # no W&B service in the test process for later tests to inherit
    assert main([*args, "--hessian-samples", "32", "--hessian-iterations", "2"]) == 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert math.isfinite(evaluation["sharpness"]) and evaluation["sharpness"] != 0


def test_ctrl_c_checkpoints_and_exits_3(data_root: Path, tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) is a request to stop like SIGTERM: a checkpoint within one step, exit 3,
    one line; the same command continues."""
    cell = tmp_path / "cell"
    args = [sys.executable, "-m", "zsharp", "train", "--dataset", "digits", "--model",
            "resnet20", "--optimizer", "zsharp", "--epochs", "3", "--batch-size", "64",
            "--threads", "1", "--out", str(cell), "--data-root", str(data_root),
            "--wandb-mode", "disabled", "--progress", "lines"]  # fmt: skip
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (cell / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stderr
    assert "stopped by SIGINT; checkpoint written" in stderr and "Traceback" not in stderr
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resuming" in again.stderr, again.stderr
