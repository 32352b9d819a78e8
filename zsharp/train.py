"""Train one cell: data on the device, a SAM-family (or plain) optimizer, checkpoints, W&B.

A cell directory receives, as training goes:

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
:data:`EXIT_INTERRUPTED`; a non-finite loss stops it with :data:`EXIT_NONFINITE`, keeping
the last good checkpoint and writing no summary.

On several processes (``torchrun``, :mod:`zsharp.distributed`) every rank trains on its
shard of each global batch, DDP averages the gradients, and rank 0 alone writes the cell;
the signals, the non-finite check and the checkpoints keep their guarantees because the
ranks agree on them in one all-reduce at each synchronisation point.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from zsharp import __version__, atomic, checkpoint, distributed
from zsharp.config import CellConfig, ConfigError, Runtime, run_group, run_name
from zsharp.data.loader import DeviceLoader, eval_loader, train_loader
from zsharp.distributed import World
from zsharp.metrics import evaluate
from zsharp.optim import SAM, create
from zsharp.optim.registry import get_optimizer
from zsharp.optim.step import loss_passes, two_pass_step
from zsharp.runtime import build_cell_model, load_data, select_device, set_precision
from zsharp.schedule import lr_lambda
from zsharp.tracking import Tracker

EXIT_INTERRUPTED = 3  # a checkpoint was written; run the same command again to continue
EXIT_NONFINITE = 4  # the loss became NaN or inf; the last good checkpoint is kept
CHECKPOINT_FORMAT = 1


# per-epoch means over the sharpness-aware steps (metrics.jsonl, W&B, the summary's final):
# ‖g‖ at w, ‖ε‖, the fraction of gradient entries the filter kept, cos∠(filtered, full
# ascent direction), the loss at w and at w + ε, and their difference (SAM's sharpness
# estimate; not the Hessian's top eigenvalue that `zsharp evaluate` calls sharpness)
DIAGNOSTICS = (
    "grad_norm",
    "epsilon_norm",
    "kept_fraction",
    "ascent_cosine",
    "loss_at_w",
    "loss_at_w_eps",
    "sam_sharpness",
)


class PreemptedError(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, path: Path) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; checkpoint written to {path}: "
            "run the same command again to continue"
        )
        self.signum = signum


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    """The number of correct predictions of a (micro-)batch, on the device."""
    return (logits.argmax(dim=1) == y).sum()


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def check_world(cfg: CellConfig, processes: int, device_type: str, train_images: int) -> None:
    """Refuse, naming the key, a cell whose batches cannot be split as it asks: over
    ``processes`` data-parallel ranks and each rank's shard into ``micro_batches`` (called
    before any process starts, and by every rank)."""
    last = train_images % cfg.batch_size or cfg.batch_size
    smallest = min(cfg.batch_size, last)
    if smallest < processes:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} leaves a batch of {last} images for "
            f"{processes} processes; every process needs at least one image of every batch"
        )
    if smallest // processes < cfg.micro_batches:
        raise ConfigError(
            f"micro_batches: {cfg.micro_batches} is more than the {smallest // processes} "
            f"images of the smallest batch{' per process' * (processes > 1)} "
            f"(batch_size {cfg.batch_size}, {train_images} training images)"
        )
    if cfg.sync_bn and device_type != "cuda":
        raise ConfigError("sync_bn: SyncBatchNorm runs on CUDA devices only")


def param_groups(model: torch.nn.Module, cfg: CellConfig) -> list[dict[str, Any]]:
    """The model's parameters as the optimizer's groups: one group, or for ASAM with
    ``adaptive_scope: weights`` the tensors named *weight* (scaled by T = |w| + η) and the
    rest (T = 1) in two groups under one global norm, as the released code's ASAM."""
    if cfg.adaptive_scope == "all":
        return [{"params": list(model.parameters())}]
    named = list(model.named_parameters())
    weights = [p for name, p in named if "weight" in name]
    others = [p for name, p in named if "weight" not in name]
    return [{"params": weights}, {"params": others, "adaptive": False}]


class StopSignals:
    """Records SIGTERM/SIGUSR1/SIGINT (Ctrl-C) so the loop can checkpoint at the next step
    boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class Progress:
    """The state of training that a checkpoint must carry besides model and optimizer."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed in the current epoch (mid-epoch checkpoints)
    records: list[dict[str, Any]] = field(default_factory=list)
    # running sums of the current epoch: loss·n, correct, n
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    epoch_train_seconds: float = 0.0
    epoch_lr: float | None = None  # the learning rate at the epoch's first step
    # the epoch's sums of DIAGNOSTICS and the count of sharpness-aware steps
    diagnostics: list[float] = field(default_factory=lambda: [0.0] * (len(DIAGNOSTICS) + 1))
    wandb_run_id: str | None = None


class CellTrainer:
    """Everything one cell's training needs, built from a CellConfig and a Runtime."""

    def __init__(self, cfg: CellConfig, rt: Runtime, world: World | None = None) -> None:
        self.cfg, self.rt = cfg.validate(), rt
        self.world = world = world or World()
        self.device = select_device(rt.device)
        if world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(self.device)
        self.autocast_dtype = set_precision(cfg.precision, self.device)
        if rt.threads:
            torch.set_num_threads(max(1, rt.threads // world.size))
        self.data = load_data(cfg, rt.data_root)
        check_world(cfg, world.size, self.device.type, len(self.data.train_y))
        if world.distributed:
            distributed.init(world, self.device.type)
        cuda = self.device.type == "cuda"
        self._seed_everything(cfg.seed)
        model = build_cell_model(cfg, self.data).to(self.device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.net: torch.nn.Module = model  # what the training passes run (DDP's wrapper)
        if world.distributed:
            self.net = self._data_parallel(model)
            if world.rank > 0:  # its own stream for dropout; rank 0 keeps one process's
                torch.manual_seed(
                    int(np.random.SeedSequence([cfg.seed, world.rank]).generate_state(1)[0])
                )
        self.forward: Callable[[Tensor], Tensor] = (
            torch.compile(self.net) if rt.compile else self.net
        )
        self.eval_forward: Callable[[Tensor], Tensor] = (
            self.forward if not world.distributed else model  # no collective in evaluation
        )
        self.stopping = False  # every rank agreed to checkpoint and stop
        self._loss_fn = functools.partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)
        kwargs = cfg.optimizer_kwargs()
        if rt.graphs:
            from zsharp.graphs import graph_base_kwargs

            base = cfg.optimizer if get_optimizer(cfg.optimizer).is_base else cfg.base
            kwargs |= graph_base_kwargs(base, self.device)
        self.optimizer = create(cfg.optimizer, param_groups(model, cfg), **kwargs)
        self.sam = isinstance(self.optimizer, SAM)
        if self.sam:  # ‖g‖, ‖ε‖, kept fraction, cosine: device tensors, no host sync
            self.optimizer.record_diagnostics = True
        # Σ over the epoch's sharpness-aware steps of DIAGNOSTICS, and their count, kept on
        # the device and updated in place (a CUDA graph replays into this very tensor)
        self.diagnostic_sums = torch.zeros(
            len(DIAGNOSTICS) + 1, dtype=torch.float64, device=self.device
        )
        self.train_batches: DeviceLoader = train_loader(
            self.data,
            cfg.batch_size,
            device=self.device,
            seed=cfg.seed,
            augment=cfg.augment,
            padding=cfg.crop_padding,
            flip=cfg.flip,
            channels_last=cuda,
            rank=world.rank,
            world_size=world.size,
        )
        self.test_batches = eval_loader(
            self.data, cfg.eval_batch_size, device=self.device, channels_last=cuda
        )
        steps_per_epoch = len(self.train_batches)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, steps_per_epoch)
        )
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None
        )
        self.graphed: Any = None
        if rt.graphs:
            self.graphed = self._graphed_step()
        self.progress = Progress()

    def _graphed_step(self) -> Any:
        """The step as CUDA graphs (``graphs``; uncaptured on a CPU), or a ConfigError."""
        from zsharp.graphs import GraphedStep, tensor_lr_

        tensor_lr_(self.optimizer)  # after the scheduler: it fills the tensor in place
        try:
            return GraphedStep(
                self._step_body,
                model=self.net,
                optimizer=self.optimizer,
                capture=self.device.type == "cuda",
                grad_scaler=self.scaler,
                compiled=self.rt.compile,
            )
        except ValueError as error:  # the message names the key (graphs: …)
            raise ConfigError(str(error)) from None

    def _data_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        import random

        random.seed(seed)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # --- checkpoints -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        p = self.progress
        return {
            "format": CHECKPOINT_FORMAT,
            "config_digest": self.cfg.digest(),
            "config": self.cfg.to_dict(),
            "epoch": p.epoch,
            "batch": p.batch,
            "records": p.records,
            "sums": p.sums,
            "epoch_train_seconds": p.epoch_train_seconds,
            "epoch_lr": p.epoch_lr,
            "diagnostics": p.diagnostics,
            "wandb_run_id": p.wandb_run_id,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": checkpoint.rng_state(),
            "world_size": self.world.size,
            # every rank's generators (dropout draws differ between ranks)
            "rng_ranks": distributed.gather(checkpoint.rng_state())
            if self.world.distributed
            else None,
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint (every rank calls it: the generators are gathered)."""
        state = self.state()
        if self.world.main:
            checkpoint.save(self.rt.checkpoint_path, state)

    def try_resume(self) -> bool:
        """Load the checkpoint if there is one for this configuration.

        A checkpoint that cannot be read or loaded (truncated by a full or flaky disk,
        overwritten, not a checkpoint) is renamed aside with one warning naming it, and
        training starts afresh, exactly as if it had never existed: whatever it had
        already changed (weights, optimizer, generators) is put back first.
        """
        if not self.world.distributed:
            return self._resume(self._read_checkpoint())
        # rank 0 reads (and sets aside a bad file); every rank applies what it read
        box = [self._read_checkpoint(map_location="cpu") if self.world.main else None]
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0)
        return self._resume(box[0])

    def _set_aside(self, reason: str) -> None:
        path = self.rt.checkpoint_path
        if not self.world.main:
            return
        aside = checkpoint.set_aside(path)
        print(
            f"zsharp: warning: {path}: unusable checkpoint set aside as {aside.name} "
            f"({' '.join(reason.split())[:300]}); training starts afresh",
            file=sys.stderr,
            flush=True,
        )

    def _read_checkpoint(self, map_location: Any = None) -> dict[str, Any] | None:
        """The checkpoint of this configuration, or None (absent, unusable: set aside)."""
        path = self.rt.checkpoint_path
        if not path.exists():
            return None

        def set_aside(reason: str) -> None:
            self._set_aside(reason)

        try:
            state = checkpoint.load(path, map_location=map_location or self.device)
        except checkpoint.CorruptCheckpointError as error:
            set_aside(str(error).removeprefix(f"{path}: "))
            return None
        if not isinstance(state, dict):
            set_aside(f"holds a {type(state).__name__}, not a checkpoint")
            return None
        if (
            state.get("format") != CHECKPOINT_FORMAT
            or state.get("config_digest") != self.cfg.digest()
        ):
            print(f"ignoring {path}: it belongs to another configuration", file=sys.stderr)
            return None
        if state.get("world_size", 1) != self.world.size:
            print(
                f"ignoring {path}: it was written by {state.get('world_size', 1)} processes, "
                f"this run has {self.world.size} (run with --processes "
                f"{state.get('world_size', 1)} to continue from epoch {state.get('epoch', 0) + 1})",
                file=sys.stderr,
            )
            return None
        return state

    def _resume(self, state: dict[str, Any] | None) -> bool:
        """Load a checkpoint's state; one that does not fit is set aside (False)."""
        if state is None:
            return False
        import copy

        fresh = {
            "model": {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            },
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "scaler": None if self.scaler is None else copy.deepcopy(self.scaler.state_dict()),
            "rng": checkpoint.rng_state(),
        }
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            ranks = state.get("rng_ranks")
            checkpoint.set_rng_state(ranks[self.world.rank] if ranks else state["rng"])
            progress = Progress(
                epoch=int(state["epoch"]),
                batch=int(state["batch"]),
                records=list(state["records"]),
                sums=[float(x) for x in state["sums"]],
                epoch_train_seconds=float(state["epoch_train_seconds"]),
                epoch_lr=state["epoch_lr"],
                diagnostics=[float(x) for x in state["diagnostics"]],
                wandb_run_id=state["wandb_run_id"],
            )
        except Exception as error:  # a well-formed file whose contents do not fit
            self.model.load_state_dict(fresh["model"])
            self.optimizer.load_state_dict(fresh["optimizer"])
            self.scheduler.load_state_dict(fresh["scheduler"])
            if self.scaler is not None:
                self.scaler.load_state_dict(fresh["scaler"])
            checkpoint.set_rng_state(fresh["rng"])
            self._set_aside(f"{type(error).__name__}: {error}")
            return False
        if not self.world.main:  # the running sums are rank 0's (the ranks' total)
            progress.sums = [0.0] * len(progress.sums)
            progress.diagnostics = [0.0] * len(progress.diagnostics)
        self.progress = progress
        return True

    # --- one step, one epoch -----------------------------------------------------------

    def step(self, x: Tensor, y: Tensor, share: float | None = None) -> tuple[Tensor, Tensor]:
        """One optimizer step; returns (training loss, number correct), both on the device:
        measured at w, or at w + ε for a sharpness-aware step with ``train_metrics_at``.

        With ``sam_interval`` k, steps 0, k, 2k, … (counted over the whole run, so a resumed
        run keeps the phase) are sharpness-aware and the others the base optimizer's.
        On several processes ``share`` weighs this rank's gradient (see :meth:`_step_body`);
        with ``ddp: m-sharpness`` the first pass is not all-reduced, so ε is this rank's own.
        With ``graphs`` the step is a replay of its CUDA graph (:mod:`zsharp.graphs`)."""
        sharpness_aware = self.sam and self.scheduler.last_epoch % self.cfg.sam_interval == 0
        if self.graphed is not None:
            loss, correct = self.graphed(x, y, sharpness_aware)
        else:
            loss, correct = self._step_body(x, y, sharpness_aware, share)
        self.scheduler.step()
        return loss, correct

    def _step_body(
        self, x: Tensor, y: Tensor, sharpness_aware: bool, share: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """The step without the scheduler's (what a CUDA graph captures):
        :func:`zsharp.optim.step.two_pass_step` over the cell's micro-batches.

        ``share`` = processes × this rank's images / the global batch's weighs this rank's
        gradient, so that DDP's mean over ranks is the gradient of the global batch's mean
        loss (shards differ in size by one image at most)."""
        cfg = self.cfg
        passes = loss_passes(
            self.forward,
            self._loss_fn,
            x,
            y,
            cfg.micro_batches,
            autocast=self.autocast,
            grad_scaler=self.scaler,
            gradient_weight=share,
            measure=_correct,
        )
        result = two_pass_step(
            self.optimizer,
            self.net,
            passes,
            sharpness_aware=sharpness_aware,
            grad_scaler=self.scaler,
            max_grad_norm=cfg.max_grad_norm,
            ddp=cfg.ddp,  # type: ignore[arg-type]
            bn_both_passes=cfg.bn_both_passes,
            keep_grads=False,
        )
        loss, outputs = result.loss, result.outputs
        if result.perturbed_loss is not None:
            self._count_diagnostics(result.loss, result.perturbed_loss)
            if cfg.train_metrics_at == "w+eps":
                loss, outputs = result.perturbed_loss, result.perturbed_outputs
        correct = outputs[0] if len(outputs) == 1 else torch.stack(list(outputs)).sum()
        return loss.float(), correct

    def _count_diagnostics(self, loss: Tensor, perturbed: Tensor) -> None:
        """Add this sharpness-aware step's :data:`DIAGNOSTICS` to the epoch's sums, in
        place and on the device; a step whose gradient overflowed (fp16) is left out."""
        d = self.optimizer.diagnostics
        at_w, at_eps = loss.detach().double(), perturbed.detach().double()
        values = torch.stack(
            [
                d["grad_norm"].double(),
                d["epsilon_norm"].double(),
                d["kept_fraction"].double(),
                d["cosine"].double(),
                at_w,
                at_eps,
                at_eps - at_w,
                torch.ones((), dtype=torch.float64, device=at_w.device),
            ]
        )
        counted = torch.isfinite(d["grad_norm"]) & torch.isfinite(at_eps - at_w)
        self.diagnostic_sums.add_(torch.where(counted, values, torch.zeros_like(values)))

    def train_epoch(self, stop: StopSignals, bar: Any) -> None:
        """Train from ``progress.batch`` to the end of epoch ``progress.epoch``."""
        p = self.progress
        self.model.train()
        loader = self.train_batches
        loader.set_epoch(p.epoch)
        # the sums stay on the device; a host sync only every `sync_every` steps
        sums = torch.tensor(p.sums, dtype=torch.float64, device=self.device)
        self.diagnostic_sums.copy_(torch.tensor(p.diagnostics, dtype=torch.float64))
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        sync_every = 1 if self.device.type == "cpu" else 50
        world = self.world
        if world.distributed:  # every rank synchronises at the same steps (a collective)
            sync_every = 1 if self.device.type == "cpu" else 10
        batch, total = loader.batch_size, loader.num_samples
        started = time.perf_counter()
        for index, (x, y) in enumerate(loader.batches(start=p.batch), start=p.batch):
            share = None
            if world.distributed:  # this rank's images over the global batch's, × ranks
                share = world.size * len(y) / min(batch, total - index * batch)
            loss, correct = self.step(x, y, share)
            n = float(len(y))
            sums += torch.stack([loss.double() * n, correct.double(), sums.new_tensor(n)])
            bad = ~torch.isfinite(loss)
            first_bad = torch.where(bad & (first_bad < 0), index, first_bad)
            p.batch = index + 1
            last = p.batch == len(loader)
            synced = last or p.batch % sync_every == 0
            at = -1
            if world.distributed:  # the ranks agree on stopping and on a non-finite loss
                if synced:
                    self.stopping, at = distributed.agree(stop.received is not None, first_bad)
            else:
                self.stopping = stop.received is not None
                synced = synced or self.stopping
                if synced:
                    at = int(first_bad)
            if at >= 0:
                raise NonFiniteLossError(
                    f"non-finite training loss at epoch {p.epoch + 1}, step {at + 1} of "
                    f"{len(loader)}; the last good checkpoint is kept at "
                    f"{self.rt.checkpoint_path}"
                )
            if bar is not None:
                if synced:
                    bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
                bar.update(1)
            if self.stopping and not last:
                p.sums = self._total(sums.tolist())
                p.diagnostics = self._total(self.diagnostic_sums.tolist())
                p.epoch_train_seconds += time.perf_counter() - started
                self.save_checkpoint()
                raise PreemptedError(stop.received or signal.SIGTERM, self.rt.checkpoint_path)
        p.sums = sums.tolist()
        p.diagnostics = self.diagnostic_sums.tolist()
        p.epoch_train_seconds += time.perf_counter() - started

    def _total(self, sums: list[float]) -> list[float]:
        """The running sums of every rank: their total on rank 0, zeros on the others (so
        that the total stays right when rank 0 alone carries it through a checkpoint)."""
        if not self.world.distributed:
            return sums
        total = distributed.all_sum(sums, self.device)
        return total if self.world.main else [0.0] * len(sums)

    def finish_epoch(self) -> dict[str, Any]:
        """Evaluate, record the epoch, reset the running sums. On several processes rank 0
        evaluates alone (the others wait at the next collective) and the training sums are
        the ranks' total."""
        p = self.progress
        lr = p.epoch_lr
        loss_sum, correct, n = self._total(p.sums)
        *diagnostics, steps = self._total(p.diagnostics)
        if self.world.main:
            test = evaluate(self.eval_forward, self.test_batches, self.autocast)  # type: ignore[arg-type]
            test_loss, test_acc = test.loss, test.accuracy
        else:
            test_loss = test_acc = math.nan
        n = n or math.nan  # the other ranks' records are never written
        record = {
            "epoch": p.epoch + 1,
            "train_loss": loss_sum / n,
            "train_acc": correct / n,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": lr,
            "epoch_seconds": p.epoch_train_seconds,
            "images_per_second": n / max(p.epoch_train_seconds, 1e-9),
        }
        if self.sam:  # means over the epoch's sharpness-aware steps
            means = (v / steps if steps else None for v in diagnostics)
            record |= dict(zip(DIAGNOSTICS, means, strict=True))
        p.records.append(record)
        p.epoch, p.batch, p.sums, p.epoch_train_seconds = p.epoch + 1, 0, [0.0, 0.0, 0.0], 0.0
        p.diagnostics = [0.0] * len(p.diagnostics)
        p.epoch_lr = None
        return record


def identity(cfg: CellConfig, rt: Runtime) -> dict[str, Any]:
    """What a summary says the cell is: its grid entry (label) and key, its configuration."""
    return {
        "label": rt.label or cfg.optimizer,
        "key": rt.key,
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
    from zsharp import cell

    with cell.claim(out, "zsharp train", check=False):
        with (out / cell.FAILURES).open("a") as handle:  # append-only history
            handle.write(json.dumps(entry) + "\n")
        if not (out / cell.METRICS).exists():
            atomic.write_jsonl(out / cell.METRICS, [])
        atomic.write_json(
            out / cell.SUMMARY,
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

    The cell is owned for the whole run (:func:`zsharp.cell.claim`: a second process on it
    fails at once, naming this one) and the previous run's results are removed before
    anything else, so a summary never describes other metrics than those beside it.
    On several processes (``world``, default: what torchrun's variables say) rank 0 owns
    and writes the cell; the other ranks train and return an empty summary.
    """
    from zsharp import cell

    rt.validate()
    world = world or World.from_environ()
    with cell.claim(rt.out) if world.main else contextlib.nullcontext(rt.out):
        if world.main:
            cell.clear_results(rt.out)
            where = rt.checkpoint_path.parent
            if where.resolve() != rt.out.resolve() and where.is_dir():  # killed writers' files
                atomic.remove_stale_temps(where, [rt.checkpoint_path.name])
        trainer = CellTrainer(cfg, rt, world)
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
                        atomic.write_jsonl(rt.out / "metrics.jsonl", p.records)
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
            atomic.write_jsonl(rt.out / "metrics.jsonl", p.records)
            checkpoint.save(rt.out / "model.pt", trainer.model.state_dict())
            summary = summarize(cfg, rt, trainer)
            atomic.write_json(rt.out / "summary.json", summary)
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
