"""Train one cell: the run around its trainer, from claiming the folder to the summary.

A cell directory receives, as training goes (:mod:`zsharp.pipeline.cell.folder` names and
writes its files):

``metrics.jsonl``   one line per epoch (epoch, train_loss, train_acc, test_loss, test_acc,
                    lr, epoch_seconds, images_per_second), rewritten atomically each epoch;
``model.pt``        the final weights (a state_dict; ``torch.load(weights_only=True)``);
``summary.json``    the resolved configuration and the final and best metrics, written
                    last: its presence means the cell finished.

and a checkpoint (``checkpoint.pt`` unless ``--checkpoint`` says elsewhere) after every
epoch. Started again with the same command, a killed run continues from its checkpoint and
ends with the same ``model.pt`` and the same ``metrics.jsonl`` (timings aside) as a run
that was never interrupted. SIGTERM or SIGUSR1 (SLURM's preemption and time-limit
warnings) make it write a checkpoint after the current step and exit with
:data:`~zsharp.pipeline.cell.trainer.EXIT_INTERRUPTED`; a non-finite loss stops it with
:data:`~zsharp.pipeline.cell.trainer.EXIT_NONFINITE`, keeping the last good checkpoint and
writing no summary. On several processes rank 0 alone writes the cell.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from zsharp import __version__, atomic
from zsharp.pipeline.cell import checkpoint, folder
from zsharp.pipeline.cell.config import CellConfig, Runtime, run_group, run_name
from zsharp.pipeline.cell.distributed import World
from zsharp.pipeline.cell.tracking import Tracker
from zsharp.pipeline.cell.trainer import CellTrainer, PreemptedError, StopSignals


def identity(cfg: CellConfig, rt: Runtime) -> dict[str, Any]:
    """What a summary says the cell is: its grid entry (label) and key, its configuration."""
    return {
        "label": rt.label or cfg.optimizer,
        "key": rt.key,
        # a matched control: the entry whose ‖ε‖ this cell's ρ equals
        "matched": rt.matched,
        "config": cfg.to_dict(),
        "config_digest": cfg.digest(),
    }


def summarize(cfg: CellConfig, rt: Runtime, trainer: CellTrainer) -> dict[str, Any]:
    """The summary written last: configuration, final and best metrics, provenance."""
    records = trainer.progress.records
    final = records[-1]
    best = max(records, key=lambda r: r["test_acc"])
    return {
        "status": "ok",
        **identity(cfg, rt),
        "final": {k: v for k, v in final.items() if k not in ("epoch_seconds",)},
        "best": {"test_acc": best["test_acc"], "epoch": best["epoch"]},
        "train_seconds": sum(r["epoch_seconds"] for r in records),
        "images_per_second": float(np.median([r["images_per_second"] for r in records])),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "device": str(trainer.device),
        "device_name": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
        "precision": cfg.precision,
        "compile": rt.compile,
        "graphs": rt.graphs,
        # data parallel: the processes, and the m of m-sharpness (images per ε)
        "processes": trainer.world.size,
        "ddp": cfg.ddp if trainer.world.distributed else None,
        "m": -(-cfg.batch_size // trainer.world.size)  # the largest shard
        if trainer.world.distributed and cfg.ddp == "m-sharpness"
        else None,
        # the noisy training labels (rate, kind, how many are wrong, their digest)
        "label_noise": trainer.label_noise,
        "versions": {"zsharp": __version__, "torch": torch.__version__},
        "wandb_run_id": trainer.progress.wandb_run_id,
        # where it ran: the scheduler's job and the devices it was given
        "host": platform.node(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def record_failure(
    cfg: CellConfig, rt: Runtime, error: BaseException, transient: bool = False
) -> None:
    """Write a ``failed`` summary (and keep a log of failures) for a workflow's table.

    ``transient``: the failure may not recur (I/O, out of memory, …), so it is no result:
    the summary says so, the table shows the seed as MISSING with this error, and the
    workflow trains the cell again on its next run (a new ``failures.jsonl`` line changes
    the rule's parameters). Otherwise the failure is the cell's result (a divergence).
    """
    out = rt.out
    entry = {
        "status": "failed",
        "transient": transient,
        "error": f"{type(error).__name__}: {' '.join(str(error).split())}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with folder.claim(out, "zsharp train", check=False):
        folder.append_failure(out, entry)
        if not (out / folder.METRICS).exists():
            folder.write_metrics(out, [])
        folder.write_summary(
            out,
            {
                **entry,
                **identity(cfg, rt),
                "versions": {"zsharp": __version__, "torch": torch.__version__},
            },
        )


def _progress_bar(rt: Runtime, total: int, epoch: int, epochs: int) -> Any:
    show = rt.progress == "bar" or (rt.progress == "auto" and sys.stderr.isatty())
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)


def train_cell(cfg: CellConfig, rt: Runtime, world: World | None = None) -> dict[str, Any]:
    """Train (or resume) one cell; write metrics, weights and summary to ``rt.out``.

    The cell is owned for the whole run (:func:`~zsharp.pipeline.cell.folder.claim`: a
    second process on it fails at once, naming this one). The previous run's results are
    removed once the trainer is built, i.e. once every check that can refuse the run (the
    data, the model, the optimizer, the batches) has passed: a refused run deletes
    nothing, and a summary never describes other metrics than those beside it. On several
    processes (``world``, default: what torchrun's variables say) rank 0 owns and writes
    the cell; the other ranks train and return an empty summary.
    """
    rt.validate()
    world = world or World.from_environ()
    with folder.claim(rt.out) if world.main else contextlib.nullcontext(rt.out):
        trainer = CellTrainer(cfg, rt, world)
        if world.main:
            folder.clear_results(rt.out)
            where = rt.checkpoint_path.parent
            if where.resolve() != rt.out.resolve() and where.is_dir():  # killed writers' files
                atomic.remove_stale_temps(where, [rt.checkpoint_path.name])
        resumed = trainer.try_resume()
        p = trainer.progress
        group = run_group(cfg.dataset, cfg.model)
        name = rt.wandb_name or run_name(rt.label or cfg.optimizer, cfg.seed)
        tracker = Tracker(
            mode=rt.wandb_mode if world.main else "disabled",
            project=rt.wandb_project,
            entity=rt.wandb_entity,
            directory=rt.wandb_directory,
            group=group,
            name=name,
            job_type="train",
            config={
                **cfg.to_dict(),
                "device": str(trainer.device),
                "compile": rt.compile,
                "processes": world.size,
                "zsharp": __version__,
            },
            run_id=p.wandb_run_id,
        )
        if world.main:
            p.wandb_run_id = tracker.run_id
        log = _log_line(rt) if world.main else (lambda _message: None)
        if resumed:
            log(f"resuming {group}/{name} at epoch {p.epoch + 1}, batch {p.batch}")
        exit_code = 1
        try:
            with StopSignals() as stop:
                while p.epoch < cfg.epochs:
                    if p.epoch_lr is None:
                        p.epoch_lr = float(trainer.optimizer.param_groups[0]["lr"])
                    bar = None
                    if world.main:
                        total = len(trainer.train_batches)
                        bar = _progress_bar(rt, total, p.epoch + 1, cfg.epochs)
                    try:
                        trainer.train_epoch(stop, bar)
                    finally:
                        if bar is not None:
                            bar.close()
                    record = trainer.finish_epoch()
                    if world.main:
                        folder.write_metrics(rt.out, p.records)
                    trainer.save_checkpoint()
                    tracker.log(
                        {k: v for k, v in record.items() if k != "epoch"}
                        | {"epoch": record["epoch"]},
                        step=record["epoch"],
                    )
                    log(
                        f"epoch {record['epoch']}/{cfg.epochs} "
                        f"train_loss {record['train_loss']:.4f} "
                        f"train_acc {record['train_acc']:.4f} test_loss {record['test_loss']:.4f} "
                        f"test_acc {record['test_acc']:.4f} lr {record['lr']:.4g} "
                        f"{record['epoch_seconds']:.1f}s {record['images_per_second']:.0f} img/s"
                    )
                    if trainer.stopping:
                        raise PreemptedError(stop.received or signal.SIGTERM, rt.checkpoint_path)
            if not world.main:
                exit_code = 0
                return {}
            folder.write_metrics(rt.out, p.records)
            checkpoint.save(rt.out / folder.WEIGHTS, trainer.model.state_dict())
            summary = summarize(cfg, rt, trainer)
            folder.write_summary(rt.out, summary)
            tracker.summary(
                {"final_" + k: v for k, v in summary["final"].items()}
                | {"best_test_acc": summary["best"]["test_acc"]}
            )
            rt.checkpoint_path.unlink(missing_ok=True)
            exit_code = 0
            return summary
        finally:
            tracker.finish(exit_code=exit_code)


def _log_line(rt: Runtime) -> Callable[[str], None]:
    def log(message: str) -> None:
        print(f"[{rt.out}] {message}", file=sys.stderr, flush=True)

    return log
