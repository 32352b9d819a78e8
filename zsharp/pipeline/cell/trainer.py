"""One cell's trainer: what it trains with, built from a CellConfig and a Runtime, and
its step and epoch.

:class:`CellTrainer` holds the data on the device, the model (and its DDP wrapper on
several processes), the optimizer with its LR schedule and GradScaler, and trains one epoch
at a time with :func:`zsharp.optim.step.two_pass_step` (or its CUDA graph) per batch,
keeping the epoch's running sums on the device. The checkpoint of its state is
:mod:`zsharp.pipeline.cell.resume`'s; the run around it (folder, W&B, summary) is
:mod:`zsharp.pipeline.cell.train`'s.

On several processes (``torchrun``, :mod:`zsharp.pipeline.cell.distributed`) every rank
trains on its shard of each global batch and DDP averages the gradients; the signals and
the non-finite check keep their guarantees because the ranks agree on them in one
all-reduce at each synchronisation point.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from zsharp.data.loader import DeviceLoader, eval_loader, train_loader
from zsharp.optim import SAM, create
from zsharp.optim.registry import get_optimizer
from zsharp.optim.step import loss_passes, sharpness_aware_at, two_pass_step
from zsharp.pipeline.cell import distributed, resume
from zsharp.pipeline.cell.config import CellConfig, ConfigError, Runtime
from zsharp.pipeline.cell.distributed import World
from zsharp.pipeline.cell.metrics import evaluate
from zsharp.pipeline.cell.progress import DIAGNOSTICS, Progress
from zsharp.pipeline.cell.runtime import (
    build_cell_model,
    select_device,
    set_precision,
    training_data,
)
from zsharp.pipeline.cell.schedule import lr_lambda

EXIT_INTERRUPTED = 3  # a checkpoint was written; run the same command again to continue
EXIT_NONFINITE = 4  # the loss became NaN or inf; the last good checkpoint is kept


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
    info = get_optimizer(cfg.optimizer)
    own_ascent = processes > 1 and cfg.ddp == "m-sharpness" and not info.is_base
    if own_ascent and getattr(info.load(), "keeps_ascent_gradient", False):
        raise ConfigError(
            f"ddp: m-sharpness gives every rank its own gradient at w, which "
            f"{cfg.optimizer}'s descent uses: the ranks' weights would drift apart; "
            "use ddp: synced"
        )


def param_groups(model: torch.nn.Module, cfg: CellConfig) -> list[dict[str, Any]]:
    """The model's parameters as the optimizer's groups.

    One group; for SAM-ON (the registry's ``groups="normalization"``) the normalisation
    layers' apart from the rest, which is never perturbed (``perturb=False``); and for ASAM
    with ``adaptive_scope: weights`` each of those split into the tensors named *weight*
    (scaled by T = |w| + η) and the rest (T = 1), under one global norm, as the released
    code's ASAM."""
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    if get_optimizer(cfg.optimizer).groups == "normalization":
        from zsharp.optim.samon import normalization_groups

        groups = normalization_groups(model)
    if cfg.adaptive_scope == "all":
        return groups
    names = {id(p): name for name, p in model.named_parameters()}
    split = []
    for group in groups:
        weights = [p for p in group["params"] if "weight" in names[id(p)]]
        others = [p for p in group["params"] if "weight" not in names[id(p)]]
        extra = {k: v for k, v in group.items() if k != "params"}
        split += [{"params": weights, **extra}, {"params": others, **extra, "adaptive": False}]
    return [group for group in split if group["params"]]


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
        self.data, self.label_noise = training_data(cfg, rt.data_root)
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
            from zsharp.optim.graphs import graph_base_kwargs

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
        from zsharp.optim.graphs import GraphedStep, tensor_lr_

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

    # --- checkpoints (zsharp.pipeline.cell.resume) --------------------------------------

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0; every rank calls it)."""
        resume.save(self)

    def try_resume(self) -> bool:
        """Continue from the checkpoint of this configuration, if there is a usable one."""
        return resume.try_resume(self)

    # --- one step, one epoch -----------------------------------------------------------

    def step(self, x: Tensor, y: Tensor, share: float | None = None) -> tuple[Tensor, Tensor]:
        """One optimizer step; returns (training loss, number correct), both on the device:
        measured at w, or at w + ε for a sharpness-aware step with ``train_metrics_at``.

        With ``sam_interval`` k, steps 0, k, 2k, … (counted over the whole run, so a resumed
        run keeps the phase) are sharpness-aware and the others the base optimizer's.
        On several processes ``share`` weighs this rank's gradient (see :meth:`_step_body`);
        with ``ddp: m-sharpness`` the first pass is not all-reduced, so ε is this rank's own.
        With ``graphs`` the step is a replay of its CUDA graph (:mod:`zsharp.optim.graphs`)."""
        sharpness_aware = sharpness_aware_at(
            self.optimizer, self.scheduler.last_epoch, self.cfg.sam_interval
        )
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
        p.next_epoch()
        return record
