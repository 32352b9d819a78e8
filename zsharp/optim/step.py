"""A whole training step with any zsharp optimizer: accumulation, DDP, AMP, clipping, interval.

:class:`SharpnessAwareStep` is the helper a training loop calls once per batch;
:func:`two_pass_step` is the functional core it shares with the Lightning and Hugging Face
integrations (``zsharp.integrations``). Nobody has to place ``no_sync``, ``disable_running_stats``
or the GradScaler calls by hand.

A step on a batch B split into micro-batches B_1 … B_k (``micro_batches=k``), where pass i
back-propagates (|B_i|/|B|)·L(B_i) so that the accumulated gradient is ∇L(B):

1. first pass at w over every micro-batch: g = Σ_i (|B_i|/|B|)·∇L(B_i; w) = ∇L(B; w);
2. ``optimizer.first_step``: w ← w + ε(g) (SAM, ASAM, Friendly-SAM, ZSharp alike);
3. second pass at w + ε over the same micro-batches, BatchNorm running statistics frozen
   (:func:`~zsharp.optim.bn.disable_running_stats`): g' = ∇L(B; w + ε);
4. ``optimizer.second_step(max_grad_norm=…)``: w restored, g' clipped, the base optimizer
   steps with g'.

So a step over k micro-batches equals the step on the whole batch (for a model without
BatchNorm: BatchNorm normalises each micro-batch with its own statistics).

**DDP** (the model is a :class:`~torch.nn.parallel.DistributedDataParallel`), two named
semantics, ``ddp=``:

``"synced"`` (default)
    the first pass is all-reduced, so every rank filters and normalises the same global
    gradient and perturbs identically: the step equals one process on the global batch
    (the mean loss over all ranks' samples). Two all-reduces per step.
``"m-sharpness"``
    the first forward and backward run under ``no_sync``: rank r's ε_r comes from its own
    batch (the m-sharpness of Foret et al. 2021, Sec. 4.1, with m the per-rank batch); only
    the second pass is all-reduced, so the weights stay identical on every rank. One
    all-reduce per step. Friendly-SAM's moving average then differs between ranks.

In both, every micro-batch but the last of a pass runs under ``no_sync`` (one all-reduce
per synced pass, of the accumulated gradient). FSDP and other sharded (DTensor) parameters
are refused with an error: the Z-score filter ranks every entry of a tensor and ε's norm
runs over the whole model, so the step needs whole gradient tensors on every rank.

**AMP**: with a ``grad_scaler`` the losses are scaled, each pass is unscaled once (by the
optimizer), an overflow in either pass skips the update and ``grad_scaler.update()``
halves the scale. **Clipping**: ``max_grad_norm`` clips the descent gradient g' (after
unscaling) by its global 2-norm, as ``torch.nn.utils.clip_grad_norm_``; ε is computed from
the unclipped g (for SAM and ZSharp ε does not depend on g's scale anyway).

**interval=k**: a sharpness-aware step every k-th step (steps 0, k, 2k, …) and the base
optimizer's one-pass step otherwise — the "SAM-k" baseline of Liu et al. 2022 (LookSAM,
arXiv 2203.02714) — so a step costs about 1 + 1/k passes instead of 2. The base steps use
the same accumulation, DDP synchronisation, clipping and scaler; Friendly-SAM's moving
average is only updated on sharpness-aware steps. A plain ``torch.optim`` optimizer always
takes the one-pass path, so the same loop runs every optimizer of the registry.

Nothing here synchronises with the device (no ``.item()``); GradScaler's own ``step``
does, as in any AMP loop.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from zsharp.optim.bn import disable_running_stats
from zsharp.optim.sam import SAM, descend

DDPMode = Literal["synced", "m-sharpness"]
DDP_MODES: tuple[str, ...] = ("synced", "m-sharpness")

#: One micro-batch's forward and backward (loss weighted by its share of the batch and
#: scaled for AMP); returns the detached weighted loss, or (that loss, anything else the
#: caller wants back from the pass, e.g. its number of correct predictions).
Pass = Callable[[], "Tensor | tuple[Tensor, Any]"]
NoSync = Callable[[], AbstractContextManager[Any]]


def _active(scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    """The scaler if it scales at all (a disabled GradScaler is a no-op)."""
    return scaler if scaler is not None and scaler.is_enabled() else None


def is_sharpness_aware(optimizer: Optimizer) -> bool:
    """True for the two-pass optimizers here (SAM, ASAM, Friendly-SAM, ZSharp)."""
    return isinstance(optimizer, SAM)


def sharpness_aware_at(optimizer: Optimizer, step: int, interval: int = 1) -> bool:
    """Whether a loop's step ``step`` (0-based) takes two passes: a sharpness-aware
    optimizer's, every ``interval``-th step, and only where the optimizer's own schedule
    (:meth:`SAM.takes_two_passes`, LookSAM's k) says so."""
    return isinstance(optimizer, SAM) and step % interval == 0 and optimizer.takes_two_passes(step)


def _descends_with_ascent_gradient(optimizer: Optimizer) -> bool:
    """A variant whose descent uses g = ∇L(w), on several processes."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return distributed and bool(getattr(optimizer, "keeps_ascent_gradient", False))


def check_ddp_mode(ddp: str) -> DDPMode:
    """Return ``ddp`` if it names a DDP semantics, else raise a ValueError naming the key."""
    if ddp not in DDP_MODES:
        raise ValueError(f"ddp must be one of {list(DDP_MODES)}, got {ddp!r}")
    return ddp  # type: ignore[return-value]


def check_count(name: str, value: Any) -> int:
    """Return ``value`` if it is an int ≥ 1, else raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_whole_tensors(model: nn.Module, optimizer: Optimizer | None = None) -> None:
    """Raise a ValueError if ``model`` (or ``optimizer``) holds FSDP-sharded parameters.

    The check is free when FSDP and DTensor were never imported (nothing can be sharded).
    """
    kinds: list[type] = []
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        names = ("FullyShardedDataParallel", "FSDPModule")  # FSDP1, FSDP2 (fully_shard)
        kinds += [getattr(fsdp, n) for n in names if hasattr(fsdp, n)]
    dtensor = sys.modules.get("torch.distributed.tensor")
    dtensor_type = getattr(dtensor, "DTensor", None) if dtensor is not None else None
    if not kinds and dtensor_type is None:
        return
    sharded = next((m for m in model.modules() if kinds and isinstance(m, tuple(kinds))), None)
    what = f"FSDP module {type(sharded).__name__}" if sharded is not None else None
    if what is None and dtensor_type is not None:
        params = list(model.parameters())
        if optimizer is not None:
            params += [p for g in optimizer.param_groups for p in g["params"]]
        if any(isinstance(p, dtensor_type) for p in params):
            what = "DTensor (sharded) parameters"
    if what is not None:
        raise ValueError(
            f"sharpness-aware steps need whole parameter tensors, but the model has {what}: "
            "the Z-score filter ranks every entry of a tensor and ε's norm runs over the whole "
            "model, which FSDP shards across ranks; wrap the model in "
            "DistributedDataParallel (ddp='synced' or 'm-sharpness') instead"
        )


def ddp_no_sync(model: nn.Module) -> NoSync:
    """``model.no_sync`` for a DistributedDataParallel model, else a no-op context."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync
    return contextlib.nullcontext


def _run(
    passes: Sequence[Pass], no_sync: NoSync, sync_last: bool
) -> tuple[list[Tensor], list[Any]]:
    """Run every pass; all but the last (and the last too unless ``sync_last``) in no_sync.
    Returns their losses and what each returned beside its loss."""
    losses, outputs = [], []
    last = len(passes) - 1
    for i, run_pass in enumerate(passes):
        context = contextlib.nullcontext() if i == last and sync_last else no_sync()
        with context:
            returned = run_pass()
        loss, output = returned if isinstance(returned, tuple) else (returned, None)
        losses.append(loss.detach())
        outputs.append(output)
    return losses, outputs


@dataclass(frozen=True)
class StepResult:
    """What one step computed, as device tensors (reading one is a host sync).

    ``loss`` is Σ_i of the micro-batches' returned (weighted) losses at w, the batch's mean
    loss for passes built by :func:`loss_passes`; ``outputs`` what each first-pass
    micro-batch returned beside its loss (``None`` for a pass that returns a loss only).
    ``perturbed_loss`` and ``perturbed_outputs`` are the same at w + ε, for a
    sharpness-aware step (None and () for a one-pass step).
    """

    loss: Tensor
    outputs: tuple[Any, ...]
    perturbed_loss: Tensor | None = None
    perturbed_outputs: tuple[Any, ...] = ()

    @property
    def sharpness_aware(self) -> bool:
        """Whether the step took two passes."""
        return self.perturbed_loss is not None


def two_pass_step(
    optimizer: Optimizer,
    model: nn.Module,
    passes: Sequence[Pass],
    *,
    sharpness_aware: bool = True,
    grad_scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
    ddp: DDPMode = "synced",
    no_sync: NoSync | None = None,
    update_scaler: bool = True,
    bn_both_passes: bool = False,
    keep_grads: bool = True,
) -> StepResult:
    """One optimizer step over the micro-batches ``passes``: the only implementation of a
    step in this project (``SharpnessAwareStep``, the pipeline's trainer, its CUDA graphs
    and the Lightning and Hugging Face integrations all call it).

    Args:
        optimizer: any zsharp optimizer, or a plain ``torch.optim`` one (one-pass step).
        model: the model the passes run (a DDP wrapper included): its BatchNorm layers are
            frozen for the second pass and its gradients cleared before the first.
        passes: one callable per micro-batch; each runs forward and ``backward()`` of its
            loss, weighted by its share of the batch and scaled by the GradScaler, and
            returns the (detached) weighted loss, or a tuple (loss, anything the caller
            wants back, e.g. the number of correct predictions). A sharpness-aware step
            calls each twice.
        sharpness_aware: False takes the optimizer's one-pass step (``interval``).
        grad_scaler: the AMP GradScaler the passes scaled their losses with.
        max_grad_norm: clip the descent gradient to this global 2-norm (None: no clipping).
        ddp: ``"synced"`` or ``"m-sharpness"`` (see the module docstring).
        no_sync: the context that suspends gradient all-reduce (default: ``model.no_sync``
            for a DistributedDataParallel model, else nothing).
        update_scaler: call ``grad_scaler.update()`` at the end (False when the caller's
            framework calls it, as Hugging Face's Accelerate does).
        bn_both_passes: let BatchNorm update its running statistics in the second pass too
            (the released ZSharp code); by default each batch counts once, at w.
        keep_grads: leave the step's gradients in ``.grad`` until the next step clears
            them (False: cleared at the end, freeing their memory between steps).

    Returns:
        a :class:`StepResult`: the losses (and the passes' other returns) at w and w + ε.
    """
    if not passes:
        raise ValueError("passes: a step needs at least one micro-batch")
    check_ddp_mode(ddp)
    no_sync = no_sync or ddp_no_sync(model)
    scaler = _active(grad_scaler)
    model.zero_grad(set_to_none=True)
    optimizer.zero_grad(set_to_none=True)
    two_pass = sharpness_aware and is_sharpness_aware(optimizer)
    if two_pass and ddp == "m-sharpness" and _descends_with_ascent_gradient(optimizer):
        raise ValueError(
            "ddp: m-sharpness gives every rank its own gradient at w, but "
            f"{type(optimizer).__name__}'s descent uses that gradient and would differ "
            "between ranks (their weights would drift apart); use ddp='synced'"
        )
    # (a) synced ascent: the last micro-batch all-reduces the accumulated gradient;
    # (b) m-sharpness: no all-reduce, each rank keeps its own gradient for ε
    losses, outputs = _run(passes, no_sync, sync_last=not two_pass or ddp == "synced")
    perturbed: tuple[list[Tensor], list[Any]] | None = None
    if two_pass:
        assert isinstance(optimizer, SAM)
        optimizer.first_step(zero_grad=True, grad_scaler=scaler)
        with disable_running_stats(model, enabled=not bn_both_passes):
            perturbed = _run(passes, no_sync, sync_last=True)
        optimizer.second_step(grad_scaler=scaler, max_grad_norm=max_grad_norm)
    elif isinstance(optimizer, SAM):
        optimizer.base_step(grad_scaler=scaler, max_grad_norm=max_grad_norm)
    else:
        descend(optimizer, scaler, max_grad_norm)
    if scaler is not None and update_scaler:
        scaler.update()
    if not keep_grads:
        optimizer.zero_grad(set_to_none=True)
    if perturbed is None:
        return StepResult(_total(losses), tuple(outputs))
    return StepResult(_total(losses), tuple(outputs), _total(perturbed[0]), tuple(perturbed[1]))


def _total(losses: list[Tensor]) -> Tensor:
    return losses[0] if len(losses) == 1 else torch.stack(losses).sum()


# --- the helper a loop calls ---------------------------------------------------------------

Batch = Any


def batch_size(batch: Batch) -> int:
    """The number of samples of ``batch`` (its first tensor's dimension 0)."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return batch_size(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return batch_size(batch[0])
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into micro-batches")


def split_batch(batch: Batch, k: int) -> list[Batch]:
    """``batch`` (a tensor, or a tuple, list or dict of them) split into k micro-batches.

    Splits along dimension 0 with ``torch.tensor_split`` (views, sizes differ by at most 1).
    """
    if isinstance(batch, Tensor):
        return list(torch.tensor_split(batch, k))
    if isinstance(batch, Mapping):
        parts = {key: split_batch(value, k) for key, value in batch.items()}
        return [{key: parts[key][i] for key in batch} for i in range(k)]
    if isinstance(batch, (tuple, list)):
        columns = [split_batch(value, k) for value in batch]
        return [type(batch)(column[i] for column in columns) for i in range(k)]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into micro-batches")


def micro_batches_of(batch: Batch, k: int) -> list[tuple[Batch, float | None]]:
    """``batch`` as k (micro-batch, weight) pairs, weight = |B_i|/|B| (None when k = 1).

    Back-propagating weight·L(B_i) for every i accumulates ∇L(B) for a mean loss L.
    """
    if k == 1:
        return [(batch, None)]
    n = batch_size(batch)
    if n < k:
        raise ValueError(f"micro_batches={k} is more than the batch's {n} samples")
    return [(part, batch_size(part) / n) for part in split_batch(batch, k)]


def _call(model: Callable[..., Any], inputs: Batch) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


Autocast = Callable[[], AbstractContextManager[Any]]


def loss_passes(
    model: Callable[..., Any],
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Batch,
    targets: Batch,
    micro_batches: int = 1,
    *,
    autocast: Autocast = contextlib.nullcontext,
    grad_scaler: torch.amp.GradScaler | None = None,
    gradient_weight: float | None = None,
    measure: Callable[[Any, Any], Any] | None = None,
) -> list[Pass]:
    """The passes of :func:`two_pass_step` for a batch (``inputs``, ``targets``).

    Micro-batch i (of ``micro_batches``, split along dimension 0) runs
    ``loss_i = loss_fn(model(x_i), y_i) · |B_i|/|B|`` under ``autocast`` and
    back-propagates ``loss_i · gradient_weight`` (scaled by the GradScaler), so the
    accumulated gradient is ``gradient_weight · ∇L(B)``; ``gradient_weight`` (default 1)
    weighs a data-parallel rank's share, ranks whose shards differ in size included. A
    pass returns ``loss_i`` (detached), and with ``measure`` also
    ``measure(outputs_i, y_i)`` (e.g. the number of correct predictions).
    """
    scaler = _active(grad_scaler)

    def bind(x: Batch, y: Batch, weight: float | None) -> Pass:
        def run() -> Tensor | tuple[Tensor, Any]:
            with autocast():
                outputs = _call(model, x)
                loss = loss_fn(outputs, y)
                if weight is not None:
                    loss = loss * weight  # |B_i|/|B|: the accumulated gradient is ∇L(B)
            backward = loss if gradient_weight is None else loss * gradient_weight
            (scaler.scale(backward) if scaler is not None else backward).backward()
            if measure is None:
                return loss.detach()
            return loss.detach(), measure(outputs.detach(), y)

        return run

    return [
        bind(x, y, weight) for (x, y), weight in micro_batches_of((inputs, targets), micro_batches)
    ]


class SharpnessAwareStep:
    """Call once per batch: ``loss = step(inputs, targets)`` does a whole optimizer step.

    Args:
        model: the model (a DistributedDataParallel wrapper included); called as
            ``model(inputs)``, ``model(*inputs)`` for a tuple or ``model(**inputs)`` for a
            dict.
        optimizer: any optimizer of ``zsharp.optim`` (two passes) or of ``torch.optim``
            (one pass), e.g. from ``zsharp.optim.create``.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the samples (e.g.
            ``F.cross_entropy``).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 autocast (updated here).
        autocast: a dtype (``torch.bfloat16``, ``torch.float16``) to run the forward passes
            under ``torch.autocast`` on the model's device, or a callable returning a
            context manager; None runs in the model's precision.
        max_grad_norm: clip the descent gradient to this global 2-norm.
        interval: k ≥ 1; a sharpness-aware step every k-th call, the base step otherwise.
        ddp: ``"synced"`` or ``"m-sharpness"`` (see :mod:`zsharp.optim.step`).
        micro_batches: split each batch into this many micro-batches and accumulate (the
            step equals the one-batch step; peak activation memory drops accordingly).

    Returns of a call: the mean loss of the batch at w (a detached 0-d tensor; no host
    sync). ``steps`` counts the calls (saved by :meth:`state_dict` so that ``interval``
    resumes in phase).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        loss_fn: Callable[[Any, Any], Tensor],
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        autocast: torch.dtype | Callable[[], AbstractContextManager[Any]] | None = None,
        max_grad_norm: float | None = None,
        interval: int = 1,
        ddp: DDPMode = "synced",
        micro_batches: int = 1,
    ) -> None:
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float))
            and not isinstance(max_grad_norm, bool)
            and max_grad_norm > 0
        ):
            raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.grad_scaler = grad_scaler
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.interval = check_count("interval", interval)
        self.ddp = check_ddp_mode(ddp)
        self.micro_batches = check_count("micro_batches", micro_batches)
        self.steps = 0
        if is_sharpness_aware(optimizer):
            check_whole_tensors(model, optimizer)
        if autocast is None:
            self._autocast: Autocast = contextlib.nullcontext
        elif isinstance(autocast, torch.dtype):
            device_type = next(model.parameters()).device.type
            dtype = autocast
            self._autocast = lambda: torch.autocast(device_type, dtype=dtype)
        else:
            self._autocast = autocast

    @property
    def sharpness_aware_next(self) -> bool:
        """Whether the next call takes a two-pass step."""
        return sharpness_aware_at(self.optimizer, self.steps, self.interval)

    def __call__(self, inputs: Batch, targets: Batch) -> Tensor:
        """One optimizer step on the batch; returns its mean loss at w (detached)."""
        passes = loss_passes(
            self.model,
            self.loss_fn,
            inputs,
            targets,
            self.micro_batches,
            autocast=self._autocast,
            grad_scaler=self.grad_scaler,
        )
        result = two_pass_step(
            self.optimizer,
            self.model,
            passes,
            sharpness_aware=self.sharpness_aware_next,
            grad_scaler=self.grad_scaler,
            max_grad_norm=self.max_grad_norm,
            ddp=self.ddp,
        )
        self.steps += 1
        return result.loss

    def state_dict(self) -> dict[str, Any]:
        """The step counter (the optimizer and scaler save their own state)."""
        return {"steps": self.steps}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.steps = int(state_dict["steps"])
