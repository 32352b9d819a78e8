"""A Hugging Face ``Trainer`` whose step is the two-pass step (``zsharp-sam[transformers]``).

::

    import zsharp.optim as zo
    from zsharp.integrations.huggingface import SharpnessAwareTrainer

    trainer = SharpnessAwareTrainer(
        model=model, args=TrainingArguments(..., gradient_accumulation_steps=4,
                                            max_grad_norm=1.0, bf16=True),
        train_dataset=train,
        zsharp_optimizer="zsharp",                          # or optimizers=(opt, scheduler)
        zsharp_kwargs={"base": "adamw", "rho": 0.05},
    )
    trainer.train()

The Trainer calls ``training_step`` once per micro-batch and then clips and steps the
optimizer. A sharpness-aware step needs the gradient of the whole accumulated batch before
its second pass, so :class:`SharpnessAwareTrainer` keeps the micro-batches of an update
(the inputs only) and, at the last one, runs :func:`zsharp.optim.step.two_pass_step` over
them: the first pass accumulated over every micro-batch at w, ε, the second pass over the
same micro-batches at w + ε, the descent step. What the Trainer does for each pass is its
own ``training_step`` (``compute_loss``, the loss divided for accumulation or by
``num_items_in_batch``, autocast, ``accelerator.backward``), so:

- **gradient accumulation** (``gradient_accumulation_steps``) is the whole-batch step;
- **AMP**: ``bf16``/``fp16`` autocast as configured; with ``fp16`` Accelerate's GradScaler
  unscales each pass once, an overflow in either pass skips the step (and the scheduler
  step), and Accelerate updates the scale once per step;
- **clipping** (``max_grad_norm``) applies to the descent gradient; the logged
  ``grad_norm`` is the norm of the descent gradient after clipping;
- **DDP**: ``ddp="synced"`` or ``"m-sharpness"`` (see :mod:`zsharp.optim.step`), with
  ``accelerator.no_sync`` placed per pass; FSDP and DeepSpeed are not supported;
- **BatchNorm** running statistics move on the first pass only;
- ``sharpness_interval=k``: a two-pass step every k-th update, the base step otherwise.

The optimizer the Trainer (and Accelerate) hold is a thin view of the zsharp optimizer
whose ``step()`` does nothing — the step already ran in ``training_step`` — and whose
``param_groups``, ``state`` and ``state_dict`` are the zsharp optimizer's, so schedulers
and checkpoints work as usual. A plain ``torch.optim`` optimizer (the Trainer's default
AdamW when no zsharp optimizer is given) takes the one-pass path of the same step.
Tested with transformers 5.24 / accelerate 1.15 (the Trainer loop with
``get_batch_samples`` and ``sync_gradients`` per micro-batch, transformers ≥ 4.46).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import Trainer

import zsharp.optim as zo
from zsharp.optim.step import (
    DDPMode,
    check_count,
    check_ddp_mode,
    check_whole_tensors,
    is_sharpness_aware,
    sharpness_aware_at,
    two_pass_step,
)

__all__ = ["SharpnessAwareTrainer"]


class _SteppedInTrainingStep(Optimizer):
    """The optimizer the Trainer holds: a view of ``optimizer`` whose ``step()`` is a no-op.

    ``Optimizer.__init__`` is not called: nothing is copied, every group, state entry and
    checkpoint is the wrapped optimizer's. It is an ``Optimizer`` so that Accelerate wraps
    it (its GradScaler bookkeeping) and LR schedulers accept it.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """Nothing: the step ran in ``training_step``."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"SteppedInTrainingStep({self.optimizer!r})"


class SharpnessAwareTrainer(Trainer):
    """A ``transformers.Trainer`` whose update is the two-pass step of a zsharp optimizer.

    Args:
        zsharp_optimizer: a name of ``zsharp.optim.OPTIMIZERS`` to build when no optimizer
            is passed (``optimizers=(opt, scheduler)`` takes precedence); it gets
            ``learning_rate`` and the Trainer's weight-decay groups (no decay for biases
            and norm weights), plus ``zsharp_kwargs`` (``base``, ``rho``, …).
        zsharp_kwargs: arguments for ``zsharp.optim.create``.
        sharpness_interval: k ≥ 1: a two-pass step every k-th update.
        ddp: ``"synced"`` (default) or ``"m-sharpness"``.
        *args, **kwargs: the Trainer's.
    """

    def __init__(
        self,
        *args: Any,
        zsharp_optimizer: str | None = None,
        zsharp_kwargs: dict[str, Any] | None = None,
        sharpness_interval: int = 1,
        ddp: DDPMode = "synced",
        **kwargs: Any,
    ) -> None:
        if zsharp_optimizer is not None:
            zo.get_optimizer(zsharp_optimizer)  # a ValueError naming the known ones
        self.zsharp_optimizer = zsharp_optimizer
        self.zsharp_kwargs = dict(zsharp_kwargs or {})
        self.sharpness_interval = check_count("sharpness_interval", sharpness_interval)
        self.ddp = check_ddp_mode(ddp)
        self._micro_batches: list[tuple[Any, Any]] = []
        #: the optimizer that takes the steps (the zsharp one); None until it is created
        self.stepping_optimizer: Optimizer | None = None
        super().__init__(*args, **kwargs)
        if self.optimizer is not None:  # optimizers=(opt, scheduler)
            self.optimizer = self._view(self.optimizer)

    # --- the optimizer ------------------------------------------------------------------

    def _view(self, optimizer: Optimizer) -> Optimizer:
        """Keep ``optimizer`` as the one that steps; give the Trainer a view of it."""
        if isinstance(optimizer, _SteppedInTrainingStep):
            return optimizer
        if is_sharpness_aware(optimizer):
            check_whole_tensors(self.model, optimizer)
        self.stepping_optimizer = optimizer
        return _SteppedInTrainingStep(optimizer)

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """The zsharp optimizer of ``zsharp_optimizer`` (else the Trainer's), as a view."""
        if self.optimizer is None and self.zsharp_optimizer is not None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {
                    "params": [p for n, p in named if n in decay],
                    "weight_decay": self.args.weight_decay,
                },
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            kwargs = {"lr": self.args.learning_rate, **self.zsharp_kwargs}
            self.optimizer = zo.create(self.zsharp_optimizer, groups, **kwargs)
        elif self.optimizer is None:
            super().create_optimizer(model)
        assert self.optimizer is not None
        self.optimizer = self._view(self.optimizer)
        return self.optimizer

    # --- the step -------------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Keep the micro-batch; at the last one of an update, run the whole step.

        Returns 0 for the earlier micro-batches and the update's loss at w at the last, so
        the Trainer's running loss sums to the same value as with one pass.
        """
        self._micro_batches.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:  # not the last micro-batch of the update
            return torch.zeros((), device=self.args.device)
        micro_batches, self._micro_batches = self._micro_batches, []
        one_pass = super().training_step
        passes = [functools.partial(one_pass, model, x, n) for x, n in micro_batches]
        optimizer = self.stepping_optimizer
        assert optimizer is not None
        scaler = self.accelerator.scaler
        return two_pass_step(
            optimizer,
            model,
            passes,
            sharpness_aware=sharpness_aware_at(
                optimizer, self.state.global_step, self.sharpness_interval
            ),
            grad_scaler=scaler,
            max_grad_norm=self.args.max_grad_norm if self.args.max_grad_norm > 0 else None,
            ddp=self.ddp,
            no_sync=functools.partial(self.accelerator.no_sync, model),
            # Accelerate's optimizer.step() that follows runs scaler.step on the view (it
            # sees an overflow of either pass in the gradients left behind) and update()
            update_scaler=False,
        ).loss

    def _clip_grad_norm(self, model: nn.Module) -> Tensor:
        """Clipping already happened in the step: report the descent gradient's norm."""
        return self._descent_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        return self._descent_grad_norm(model) if grad_norm is None else grad_norm

    @staticmethod
    def _descent_grad_norm(model: nn.Module) -> Tensor:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
