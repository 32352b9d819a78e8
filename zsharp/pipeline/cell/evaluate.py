"""Evaluate a finished cell: test accuracy and loss, calibration (ECE) and sharpness.

Reads ``summary.json`` (for the configuration) and ``model.pt`` from the cell directory and
writes ``eval.json`` atomically. Sharpness is the dominant eigenvalue of the Hessian of the
training loss on a fixed subset of the training split (the first ``hessian_samples`` of a
permutation seeded by 0, without augmentation, BatchNorm in eval mode), so every optimizer's
cells are measured on the same points.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from zsharp import __version__
from zsharp.data.loader import DeviceLoader, eval_loader
from zsharp.pipeline.cell import checkpoint, folder
from zsharp.pipeline.cell.config import EVALUATE, ConfigError, from_dict, run_group, run_name
from zsharp.pipeline.cell.metrics import (
    evaluate,
    expected_calibration_error,
    hessian_top_eigenvalue,
)
from zsharp.pipeline.cell.runtime import build_cell_model, select_device, training_data
from zsharp.pipeline.cell.tracking import Tracker

_DEFAULT = {arg.name: arg.default for arg in EVALUATE}


@dataclass
class EvalOptions:
    """How to evaluate (none of it is part of the cell's configuration); the defaults are
    :data:`zsharp.pipeline.cell.config.EVALUATE`'s."""

    data_root: Path = Path("data")
    device: str = "auto"
    ece_bins: int = _DEFAULT["ece_bins"]
    hessian_samples: int = _DEFAULT["hessian_samples"]
    hessian_iterations: int = _DEFAULT["hessian_iterations"]
    hessian_tolerance: float = 1e-3
    hessian_batch_size: int = _DEFAULT["hessian_batch_size"]
    wandb_mode: str | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_dir: Path | None = None
    wandb_name: str | None = None


def evaluate_cell(cell: Path, options: EvalOptions) -> dict[str, Any]:
    """Evaluate the cell in ``cell`` and write ``cell/eval.json``."""
    started = time.perf_counter()
    try:
        summary = folder.read_summary(cell)
    except folder.RecordError as error:
        raise ConfigError(str(error)) from None
    if summary.get("status") == "failed":  # nothing to evaluate; the table shows FAILED
        result = {"status": "skipped", "reason": f"training failed: {summary.get('error')}"}
        folder.write_evaluation(cell, result)
        return result
    cfg = from_dict(summary["config"])
    device = select_device(options.device)
    data, _ = training_data(cfg, options.data_root)  # the labels it trained on
    model = build_cell_model(cfg, data)
    try:
        model.load_state_dict(checkpoint.load(cell / folder.WEIGHTS))
    except RuntimeError as error:  # the weights of another model
        raise ConfigError(
            f"{cell / folder.WEIGHTS}: does not fit the cell's model "
            f"({str(error).splitlines()[0]}); train the cell again"
        ) from None
    model.to(device).eval()

    test = evaluate(model, eval_loader(data, cfg.eval_batch_size, device=device))
    ece = expected_calibration_error(test.confidence, test.correct, options.ece_bins)

    n = min(options.hessian_samples, len(data.train_y))
    subset = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))[:n]
    subset = subset.sort().values
    # only the subset goes to the device, not the whole training split
    batches = list(
        DeviceLoader(
            data.train_x[subset],
            data.train_y[subset],
            batch_size=options.hessian_batch_size,
            mean=data.mean,
            std=data.std,
            shuffle=False,
            device=device,
        )
    )
    sharpness, products = hessian_top_eigenvalue(
        model,
        F.cross_entropy,
        batches,
        iterations=options.hessian_iterations,
        tolerance=options.hessian_tolerance,
    )
    result = {
        "status": "ok",
        "test_acc": test.accuracy,
        "test_loss": test.loss,
        "ece": ece,
        "ece_bins": options.ece_bins,
        "sharpness": sharpness,
        "hessian_samples": n,
        "hessian_vector_products": products,
        "seconds": time.perf_counter() - started,
        "device": str(device),
        "zsharp": __version__,
    }
    tracker = Tracker(
        mode=options.wandb_mode,
        project=options.wandb_project,
        entity=options.wandb_entity,
        directory=options.wandb_dir
        or (Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else cell),
        group=run_group(cfg.dataset, cfg.model),
        name=options.wandb_name or run_name(summary.get("label") or cfg.optimizer, cfg.seed),
        job_type="eval",
        config=cfg.to_dict(),
    )
    tracker.summary(result)
    tracker.finish()
    folder.write_evaluation(cell, result)
    return result
