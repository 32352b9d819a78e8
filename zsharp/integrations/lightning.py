"""Train a LightningModule with any zsharp optimizer (``pip install "zsharp-sam[lightning]"``).

Lightning's automatic optimisation runs one forward and backward per batch inside
``optimizer.step(closure)``: no room for a second pass at w + ε with BatchNorm frozen, nor
for the GradScaler and DDP calls in the places a two-pass step needs them. The mixin
switches the module to manual optimisation and runs
:func:`zsharp.optim.step.two_pass_step` in ``training_step``::

    import lightning as L
    import zsharp.optim as zo
    from zsharp.integrations.lightning import SharpnessAwareMixin

    class Net(SharpnessAwareMixin, L.LightningModule):   # the mixin first
        max_grad_norm = 5.0                                # optional settings
        def __init__(self):
            super().__init__()
            self.net = ...
        def training_loss(self, batch):                   # the mean loss of a batch
            x, y = batch
            return F.cross_entropy(self.net(x), y)
        def configure_optimizers(self):
            opt = zo.create("zsharp", self.parameters(), base="sgd", lr=0.1, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 10, 0.5)]

    L.Trainer(max_epochs=2, precision="bf16-mixed").fit(Net(), loader)

What the mixin takes care of:

- **BatchNorm**: running statistics are updated by the first pass only (each batch once).
- **AMP**: the forward passes run under Lightning's precision plugin (its autocast wraps
  ``training_step``); ``manual_backward`` scales the loss for ``precision="16-mixed"``,
  whose GradScaler unscales each pass once, skips the step on an overflow in either pass
  and is updated once per step.
- **LR schedulers** (manual optimisation leaves them to the module): those with
  ``interval="step"`` are stepped after every optimizer step, the ``"epoch"`` ones at the
  end of the training epoch, each every ``frequency`` steps or epochs; ReduceLROnPlateau
  reads its ``monitor`` from the logged metrics. ``trainer.global_step`` counts the steps.
- **DDP** (``strategy="ddp"``): ``ddp_semantics`` ``"synced"`` or ``"m-sharpness"``, the
  ``no_sync`` of Lightning's DDP wrapper placed as in :mod:`zsharp.optim.step`.
- **Clipping** (``max_grad_norm``), **accumulation** (``micro_batches``: each batch split
  in k, the step equal to the one-batch step) and the cheaper ``sharpness_interval``.
  Lightning's own ``gradient_clip_val`` and ``accumulate_grad_batches`` are for automatic
  optimisation only.

``sharpness_aware_training_step`` is the same step as a function, for a ``training_step``
of your own (then step the schedulers with :func:`step_lr_schedulers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from zsharp.optim.step import (
    Batch,
    DDPMode,
    check_count,
    check_ddp_mode,
    check_whole_tensors,
    is_sharpness_aware,
    micro_batches_of,
    sharpness_aware_at,
    two_pass_step,
)

__all__ = ["SharpnessAwareMixin", "sharpness_aware_training_step", "step_lr_schedulers"]


def sharpness_aware_training_step(
    module: pl.LightningModule,
    batch: Batch,
    loss_fn: Callable[[Batch], Tensor],
    *,
    max_grad_norm: float | None = None,
    interval: int = 1,
    ddp: DDPMode = "synced",
    micro_batches: int = 1,
) -> Tensor:
    """One optimizer step of ``module``'s (single) optimizer on ``batch``; the loss at w.

    ``loss_fn(batch)`` returns the mean loss of a (micro-)batch; it is called once per pass
    and micro-batch, and back-propagated with ``module.manual_backward``. Step-interval LR
    schedulers are stepped here. Call it from ``training_step`` with
    ``automatic_optimization = False``.
    """
    if module.automatic_optimization:
        raise RuntimeError(
            "sharpness_aware_training_step needs manual optimisation: set "
            "`automatic_optimization = False` on the module (SharpnessAwareMixin does)"
        )
    check_count("interval", interval)
    check_count("micro_batches", micro_batches)
    check_ddp_mode(ddp)
    lightning_optimizer = module.optimizers()
    if isinstance(lightning_optimizer, list):
        raise ValueError(
            f"expected one optimizer, configure_optimizers gave {len(lightning_optimizer)}"
        )
    optimizer = lightning_optimizer.optimizer
    trainer = module.trainer
    if is_sharpness_aware(optimizer) and not getattr(module, "_zsharp_checked", False):
        check_whole_tensors(module, optimizer)
        module._zsharp_checked = True
    wrapped = trainer.strategy.model
    no_sync = (
        wrapped.no_sync
        if isinstance(wrapped, nn.parallel.DistributedDataParallel)
        else contextlib.nullcontext
    )

    def run(part: Batch, weight: float | None) -> Callable[[], Tensor]:
        def backward() -> Tensor:
            loss = loss_fn(part)
            if weight is not None:
                loss = loss * weight
            module.manual_backward(loss)  # the precision plugin scales it, DDP prepares
            return loss.detach()

        return backward

    passes = [run(part, weight) for part, weight in micro_batches_of(batch, micro_batches)]
    # Lightning counts an optimizer step (trainer.global_step, its profiler) around the
    # step of a LightningOptimizer; the step runs here, so it is counted by those hooks.
    lightning_optimizer._on_before_step()
    loss = two_pass_step(
        optimizer,
        module,
        passes,
        sharpness_aware=sharpness_aware_at(optimizer, trainer.global_step, interval),
        grad_scaler=getattr(trainer.precision_plugin, "scaler", None),
        max_grad_norm=max_grad_norm,
        ddp=ddp,
        no_sync=no_sync,
    ).loss
    lightning_optimizer._on_after_step()
    step_lr_schedulers(module, "step")
    return loss


def step_lr_schedulers(module: pl.LightningModule, interval: str) -> None:
    """Step the schedulers of ``configure_optimizers`` whose ``interval`` is this one.

    As Lightning's automatic optimisation does: every ``frequency`` optimizer steps
    (``"step"``) or epochs (``"epoch"``), through the module's ``lr_scheduler_step`` hook;
    ReduceLROnPlateau gets its ``monitor`` metric (and is skipped while it is not logged).
    """
    trainer = module.trainer
    count = trainer.global_step if interval == "step" else trainer.current_epoch + 1
    for config in trainer.lr_scheduler_configs:
        if config.interval != interval or count % config.frequency != 0:
            continue
        metric = None
        if config.reduce_on_plateau:
            metric = trainer.callback_metrics.get(config.monitor) if config.monitor else None
            if metric is None:
                continue
        module.lr_scheduler_step(config.scheduler, metric)


class SharpnessAwareMixin:
    """Mixin for a LightningModule trained by a zsharp optimizer (place it first).

    Implement ``training_loss(batch) -> Tensor`` (the mean loss of a batch) and
    ``configure_optimizers`` (one optimizer, e.g. ``zsharp.optim.create("zsharp", ...)``,
    with any schedulers). Class attributes set the step:

    - ``max_grad_norm``: clip the descent gradient to this global 2-norm (None: off);
    - ``sharpness_interval``: k, a sharpness-aware step every k-th step, the base step
      otherwise;
    - ``ddp_semantics``: ``"synced"`` or ``"m-sharpness"`` under DDP;
    - ``micro_batches``: split each batch in k and accumulate.

    ``training_step`` logs ``train_loss`` (the loss at w). A module that overrides
    ``on_train_epoch_end`` calls ``super().on_train_epoch_end()`` so that epoch schedulers
    still step.
    """

    automatic_optimization = False  # Lightning reads this (a property on LightningModule)
    max_grad_norm: float | None = None
    sharpness_interval: int = 1
    ddp_semantics: DDPMode = "synced"
    micro_batches: int = 1

    def training_loss(self, batch: Batch) -> Tensor:
        """The mean loss of ``batch`` (or of a micro-batch of it)."""
        raise NotImplementedError("implement training_loss(batch) -> the mean loss of the batch")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """One sharpness-aware step (see :func:`sharpness_aware_training_step`)."""
        module: Any = self
        loss = sharpness_aware_training_step(
            module,
            batch,
            self.training_loss,
            max_grad_norm=self.max_grad_norm,
            interval=self.sharpness_interval,
            ddp=self.ddp_semantics,
            micro_batches=self.micro_batches,
        )
        module.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        """Step the epoch-interval LR schedulers."""
        module: Any = self
        step_lr_schedulers(module, "epoch")
