"""SAM and ASAM, and the two-pass step every sharpness-aware optimizer here shares.

One step at weights w with gradient g = ∇L(w):

1. ``first_step``: the ascent direction d (d = g; Friendly-SAM changes it), ε from d, and
   w ← w + ε;
2. the caller computes g' = ∇L(w + ε);
3. ``second_step``: w is restored exactly, the descent gradient is formed from g' (a
   variant's :meth:`SAM._descent` hook; SAM itself descends along g') and the base
   optimizer steps with it.

``base_step`` is the one-pass step of the same optimizer (the off steps of ``interval=k``):
the base optimizer steps with ∇L(w), through the same hook, clipping and GradScaler path.

For every parameter tensor ℓ of a group with radius ρ, with T_ℓ = |w_ℓ| + η for
``adaptive=True`` (ASAM, Kwon et al. 2021, Eq. 9) and T_ℓ = 1 otherwise (SAM, Foret et al.
2021, Eq. 2):

    ε_ℓ = ρ · T_ℓ² ⊙ d_ℓ / (‖T ⊙ d‖₂ + 1e-12),   ‖T ⊙ d‖₂ over every tensor of the model.

A filter of the direction (``zfilter=``, :class:`~zsharp.optim.zscore.ZScoreFilter` for
ZSharp) replaces this ε with its own, built from the same groups, directions and T.

Nothing here synchronises with the device: norms, fallbacks and overflow checks stay on
the device as tensors and select with arithmetic, never with a Python ``if``.

With ``diagnostics=True`` each ``first_step`` also measures what the ascent did (‖g‖, ‖ε‖,
the filter's kept fraction and cos∠(d̃, d)) as 0-d device tensors, read back through
:attr:`SAM.diagnostics`; off (the default), not one extra operation runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.optim import Optimizer

# Guards the normalisations against a zero gradient, as in the reference implementations.
NORM_EPS = 1e-12
# torch.nn.utils.clip_grad_norm_'s guard in max_norm / (‖g‖ + 1e-6).
CLIP_EPS = 1e-6
_LOW_PRECISION = (torch.float16, torch.bfloat16)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


def check_nonnegative(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def check_base_optimizer(base_optimizer: Any) -> type[Optimizer]:
    """Return ``base_optimizer`` if it is an Optimizer class, else raise a ValueError."""
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
        raise ValueError(
            "base_optimizer must be a torch.optim.Optimizer subclass such as "
            f"torch.optim.SGD (the class, not an instance), got {base_optimizer!r}"
        )
    return base_optimizer


def check_base_kwargs(base_optimizer: type[Optimizer], kwargs: dict[str, Any]) -> None:
    """Raise a ValueError naming any keyword the base optimizer does not accept."""
    parameters = inspect.signature(base_optimizer.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ValueError(
            f"unknown argument {unknown[0]!r} for base optimizer {base_optimizer.__name__} "
            f"(it takes {sorted(set(parameters) - {'self', 'params'})})"
        )


# --- multi-tensor helpers (no host sync) ----------------------------------------------------


def tensor_norms(tensors: list[Tensor]) -> list[Tensor]:
    """‖t_i‖₂ of each tensor (0-d, on its device), accumulated in float32 at least: an fp16
    norm overflows above 65504. Float64 if any tensor is float64."""
    if any(t.dtype == torch.float64 for t in tensors):  # (float32 cannot hold a float64 norm)
        return [torch.linalg.vector_norm(t, dtype=_at_least_float32(t.dtype)) for t in tensors]
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    except TypeError:  # PyTorch releases without the dtype argument
        return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]


def global_norm(tensors: list[Tensor], device: torch.device) -> Tensor:
    """‖(t₁, …, t_n)‖₂ as a 0-d tensor on ``device``, without a host sync (norms accumulated
    as in :func:`tensor_norms`)."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in tensor_norms(tensors)]))


def global_inner(a: list[Tensor], b: list[Tensor], device: torch.device) -> Tensor:
    """⟨a, b⟩ = Σ_i sum(a_i ⊙ b_i) over every tensor, a 0-d tensor on ``device``,
    accumulated in float32 at least (float64 for float64 tensors), without a host sync."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in a) else torch.float32
    return torch.stack(
        [torch.sum(x * y, dtype=dtype).to(device) for x, y in zip(a, b, strict=True)]
    ).sum()


def scale_(tensors: list[Tensor], factor: Tensor) -> None:
    """tensors ← factor · tensors for a 0-d ``factor``, on whichever devices they live."""
    for (device, dtype), group in _by_device(tensors).items():
        torch._foreach_mul_(group, factor.to(device, dtype))


def clip_grad_norm_(grads: list[Tensor], max_norm: float) -> None:
    """g ← g · min(1, c / (‖g‖₂ + 1e-6)) with ‖g‖₂ over every tensor, c = ``max_norm``.

    What ``torch.nn.utils.clip_grad_norm_(…, foreach=True)`` computes, without its host
    sync options, and with the norm of 16-bit gradients accumulated in float32.
    """
    if not grads:
        return
    norm = global_norm(grads, grads[0].device)
    scale_(grads, torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0))


def descend(
    optimizer: Optimizer,
    grad_scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
    adjust: Callable[[], None] | None = None,
) -> None:
    """One descent step of ``optimizer`` with the gradients now in ``.grad``.

    In this order: unscale them once (an active ``grad_scaler``), ``adjust`` them (a SAM
    variant's descent hook), clip them to the global 2-norm ``max_grad_norm``
    (:func:`clip_grad_norm_`), and step — through ``grad_scaler.step``, which skips the
    update if a gradient it unscaled was not finite. Every step of every optimizer here
    ends in this function, one pass or two.
    """
    if max_grad_norm is not None:
        check_nonnegative("max_grad_norm", max_grad_norm)
    scaler = _active(grad_scaler)
    if scaler is not None:
        scaler.unscale_(optimizer)  # once: scaler.step below knows it happened
    if adjust is not None:
        adjust()
    if max_grad_norm is not None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip_grad_norm_(grads, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _by_device(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault((t.device, t.dtype), []).append(t)
    return by_device


def _active(scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    """The scaler if it scales at all (a disabled GradScaler is a no-op)."""
    return scaler if scaler is not None and scaler.is_enabled() else None


# --- ε ------------------------------------------------------------------------------------


class AscentGroup:
    """One param group's part in a step: its tensors with a gradient, ρ, T and direction d."""

    def __init__(
        self, group: dict[str, Any], rho: float | Tensor | None = None, eps: float = NORM_EPS
    ) -> None:
        self.group = group
        self.eps = eps  # the guard of ε's normalisation (the variant's reference's)
        self.params = [p for p in group["params"] if p.grad is not None]
        self.grads = [p.grad for p in self.params]
        # ρ of this step: the group's, or a variant's (GSAM's ρ_t, a device tensor with a
        # tensor learning rate)
        self.rho: float | Tensor = float(group["rho"]) if rho is None else rho
        self.direction: list[Tensor] = self.grads  # d, set by SAM._direction
        # T = |w| + η (ASAM), or None for T = 1
        self.scale: list[Tensor] | None = None
        if group["adaptive"] and self.params:
            self.scale = torch._foreach_abs(self.params)
            torch._foreach_add_(self.scale, float(group["eta"]))

    def times_scale(self, tensors: list[Tensor]) -> list[Tensor]:
        """T ⊙ tensors as new tensors (a copy for T = 1, so callers may write into it).

        16-bit tensors are copied to float32: ε's factor ρ/‖g‖ can be far below their
        precision (even subnormal), and ε is added to the weights in their dtype anyway.
        """
        if any(t.dtype in _LOW_PRECISION for t in tensors):
            copies = [t.float() if t.dtype in _LOW_PRECISION else t.clone() for t in tensors]
            self.times_scale_(copies)
            return copies
        # one multi-tensor kernel per device and dtype, not a copy per tensor
        if self.scale is None:
            return torch._foreach_mul(tensors, 1.0)
        return torch._foreach_mul(tensors, self.scale)

    def times_scale_(self, tensors: list[Tensor]) -> None:
        """tensors ← T ⊙ tensors, in place."""
        if self.scale is not None:
            torch._foreach_mul_(tensors, self.scale)


def sam_epsilon(
    groups: list[AscentGroup],
    directions: list[list[Tensor]],
    device: torch.device,
    owned: bool = False,
) -> list[Tensor]:
    """ε_ℓ = ρ · T_ℓ² ⊙ d_ℓ / (‖T ⊙ d‖₂ + 1e-12), one norm over every group (SAM Eq. 2,
    ASAM Eq. 9), for the ``directions[i]`` of ``groups[i]``.

    ``owned`` directions are buffers of this step (filtered copies): ε is built in them
    instead of in new tensors.
    """
    if owned:
        for group, d in zip(groups, directions, strict=True):
            group.times_scale_(d)
        scaled = directions
    else:
        scaled = [g.times_scale(d) for g, d in zip(groups, directions, strict=True)]
    norm = global_norm([t for s in scaled for t in s], device)
    epsilon: list[Tensor] = []
    for group, s in zip(groups, scaled, strict=True):
        group.times_scale_(s)
        scale_(s, group.rho / (norm + group.eps))
        epsilon.extend(s)
    return epsilon


class DescentGroup:
    """One param group's part in a descent step: its tensors with a gradient, the
    gradients to descend along (``grads``, changed in place by a variant's hook) and, for
    a variant that keeps it (:attr:`SAM.keeps_ascent_gradient`), the ascent gradient
    g = ∇L(w) of the same step (``ascent_grads``; None otherwise and on one-pass steps)."""

    def __init__(self, group: dict[str, Any], ascent: dict[int, Tensor] | None) -> None:
        self.group = group
        self.params = [p for p in group["params"] if p.grad is not None]
        self.grads: list[Tensor] = [p.grad for p in self.params]
        self.ascent_grads = None if ascent is None else [ascent[id(p)] for p in self.params]


@runtime_checkable
class AscentFilter(Protocol):
    """What a filter of the ascent direction gives SAM (``ZScoreFilter`` is the one here)."""

    def group_defaults(self) -> dict[str, Any]:
        """Its hyperparameters' defaults, which a param group may override."""
        ...

    def check_group(self, group: dict[str, Any]) -> None:
        """Raise a ValueError naming a bad hyperparameter of ``group``."""
        ...

    def epsilon(
        self,
        groups: list[AscentGroup],
        device: torch.device,
        stats: dict[str, Tensor] | None = None,
    ) -> list[Tensor]:
        """ε for every tensor of ``groups``, in order, from their directions d.

        ``stats`` is given only with diagnostics on; it holds ``"direction_norm"`` (‖d‖) and
        the filter adds ``"kept"`` (the number of entries its masks keep, a 0-d integer
        tensor) and ``"filtered_norm"`` (‖d̃‖ of the filtered direction ε is built from, its
        fallbacks included), both on ``device`` and without a host sync. A filter that
        adds neither leaves the kept fraction and the cosine out of the diagnostics.
        """
        ...


# --- the optimizer ------------------------------------------------------------------------


class SAM(Optimizer):
    """Sharpness-Aware Minimization (Foret et al. 2021) around any base optimizer.

    Args:
        params: parameters or param groups; a group may set its own ``rho``, ``adaptive``,
            ``eta`` (and ``percentile`` when filtered) besides the base optimizer's keys.
        base_optimizer: the optimizer class that takes the descent step, e.g.
            ``torch.optim.SGD``; ``**base_kwargs`` go to it (``lr``, ``momentum``, …).
        rho: the neighbourhood radius ρ ≥ 0.
        adaptive: ASAM's scale-invariant neighbourhood, T_w = |w| + η.
        eta: η ≥ 0 of ASAM (ignored unless ``adaptive``).
        zfilter: a :class:`ZScoreFilter` to filter the ascent direction (ZSharp); any
            :class:`AscentFilter` works.
        diagnostics: measure every ``first_step`` (see :attr:`diagnostics`); the attribute
            ``record_diagnostics`` turns it on and off later. Off by default, at no cost.

    The wrapper and its base optimizer share ``param_groups``: an LR scheduler attached to
    the wrapper drives the base optimizer's learning rate. ``state_dict()`` holds this
    optimizer's own state, the base optimizer's state and the groups, never a copy of w.

    A variant is a subclass that overrides a hook: ``_direction`` (the ascent direction d,
    as :class:`FriendlySAM` does), ``_epsilon`` (ε from the directions, which a ``zfilter``
    takes over) or ``_descent`` (the descent gradient, formed in place from g' and, with
    ``keeps_ascent_gradient``, from g).
    """

    #: the guard ε in ρ·d/(‖d‖ + ε): 1e-12 as davda54/sam; a variant sets its reference's
    norm_eps: float = NORM_EPS
    #: keep g = ∇L(w) of ``first_step`` for the ``_descent`` hook (``DescentGroup.ascent_grads``):
    #: references to the gradient tensors ``first_step(zero_grad=True)`` drops anyway, a copy
    #: only when the caller keeps using ``.grad``. Such a variant's descent needs the same g
    #: on every rank, so it refuses DDP's m-sharpness (each rank's own g).
    keeps_ascent_gradient: bool = False

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        zfilter: AscentFilter | None = None,
        diagnostics: bool = False,
        **base_kwargs: Any,
    ) -> None:
        base_optimizer = check_base_optimizer(base_optimizer)
        check_base_kwargs(base_optimizer, base_kwargs)
        if zfilter is not None and not isinstance(zfilter, AscentFilter):
            raise ValueError(f"zfilter must be a ZScoreFilter or None, got {zfilter!r}")
        self.zfilter = zfilter
        defaults = {
            "rho": check_nonnegative("rho", rho),
            "adaptive": bool(adaptive),
            "eta": check_nonnegative("eta", eta),
            **self._extra_defaults(),
            **(zfilter.group_defaults() if zfilter is not None else {}),
            **base_kwargs,
        }
        super().__init__(params, defaults)  # checks each group (add_param_group)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        shared = sorted(set(self._extra_defaults()) & set(self.base_optimizer.defaults))
        if shared:  # one key of the shared param groups, two meanings
            raise ValueError(
                f"{type(self).__name__} and its base optimizer "
                f"{base_optimizer.__name__} both use the param-group key {shared[0]!r}"
            )
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        # w, saved by first_step and restored by second_step; never part of state_dict
        self._saved_weights: list[Tensor] | None = None
        self._perturbed_params: list[Tensor] = []
        self._finite: Tensor | None = None  # the first pass's gradients were finite
        self._ascent_grads: dict[int, Tensor] | None = None  # g, for keeps_ascent_gradient
        self.record_diagnostics = bool(diagnostics)
        self._diagnostics: dict[str, Tensor] = {}

    @property
    def diagnostics(self) -> dict[str, Tensor]:
        """What the last ``first_step`` did, with diagnostics on (else ``{}``).

        For one step at w with gradient g = ∇L(w) (unscaled by the GradScaler, this rank's
        under DDP), ascent direction d (g; Friendly-SAM's g − σ·m, Eq. 9 of Li et al.),
        filtered direction d̃ = d ⊙ m (ZSharp Eq. 6, with its fallbacks to d; d̃ = d
        without a filter) and the perturbation ε added to the weights:

        ``grad_norm``
            ‖g‖₂ over every parameter with a gradient (of g, not d, for Friendly-SAM);
        ``epsilon_norm``
            ‖ε‖₂ of the ε added to the weights (SAM Eq. 2, ASAM Eq. 9, ZSharp Eq. 7; for
            16-bit weights the float32 ε, before their rounding): ρ for SAM and the
            paper's ZSharp with one ρ and T = 1; ≈ ρ·√(filtered tensors) for the official
            variant; 0 when the GradScaler found an overflow;
        ``kept_fraction``
            Σ_ℓ |m_ℓ| / Σ_ℓ n_ℓ, the share of entries the Z-score masks keep (Eq. 5) over
            every tensor (the official variant's unfiltered 1-D tensors count as kept):
            k/n of the rule; 1 without a filter (SAM, ASAM, Friendly-SAM);
        ``cosine``
            cos∠(d̃, d) = ⟨d̃, d⟩ / (‖d̃‖‖d‖) = ‖d̃‖/‖d‖ in [0, 1] (d̃ is d on a subset of
            entries), before ASAM's T and any normalisation; 1 without a filter, 1 when
            d = 0. Friendly-SAM's d is compared with its filtered d̃, not with g.

        Each is a new 0-d tensor on the first parameter's device (float32; float64 with
        float64 parameters), computed on the device without a host sync: holding or
        summing them across steps is safe; reading one (``.item()``) synchronises. Set
        by ``first_step`` only: steps without one (a base-optimizer step of
        ``interval=k``) leave the last values. On a pass whose gradients overflowed,
        ``grad_norm`` is inf or NaN (a test of ``torch.isfinite`` tells such steps).
        """
        return dict(self._diagnostics) if self.record_diagnostics else {}

    @property
    def perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step`` (the weights are w + ε)."""
        return self._saved_weights is not None

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Move the weights to w + ε, computed from the gradients now in ``.grad``.

        With a ``grad_scaler`` the gradients are unscaled here (once for this pass); if they
        overflowed, ε is 0 and ``second_step`` makes the scaler skip the update.
        """
        if self._saved_weights is not None:
            raise RuntimeError("first_step() called twice: call second_step() in between")
        scaler = _active(grad_scaler)
        if scaler is not None:
            scaler.unscale_(self)  # its own record, apart from the base optimizer's
        eps = self.norm_eps
        groups = [AscentGroup(group, self._radius(group), eps) for group in self.param_groups]
        groups = [group for group in groups if group.params]
        every = [p for g in groups for p in g.params]  # every tensor with a gradient
        if not every:
            raise RuntimeError("first_step() found no gradient: call loss.backward() first")
        # groups with perturb=False descend but are never perturbed (SAM-ON's non-norm ones)
        groups = [group for group in groups if group.group.get("perturb", True)]
        params = [p for g in groups for p in g.params]
        device = every[0].device
        record = self.record_diagnostics
        grad_norm = None
        if scaler is not None or record:
            grad_norm = global_norm([p.grad for p in every], device)
        if scaler is not None:
            self._finite = torch.isfinite(grad_norm)
        for group in groups:
            group.direction = self._direction(group)
        partial = len(params) < len(every)
        if record:
            stats = {"direction_norm": self._direction_norm(groups, grad_norm, device, partial)}
            epsilon = self._epsilon(groups, device, stats=stats) if groups else []
        else:
            epsilon = self._epsilon(groups, device) if groups else []
        if self._finite is not None:  # overflow: no perturbation (NaN·0 is NaN: masked_fill)
            overflow = self._finite.logical_not()
            for e in epsilon:
                e.masked_fill_(overflow.to(e.device), 0.0)
        if record:
            self._diagnostics = self._measure(groups, epsilon, grad_norm, stats, device)
        # w is copied only now, with the temporaries of ε freed: the peak stays at w, g, ε
        # and the copy, as for plain SAM
        self._saved_weights = torch._foreach_mul(params, 1.0) if params else []  # exact, -0.0 kept
        self._perturbed_params = params
        if params:
            torch._foreach_add_(params, epsilon)
        if self.keeps_ascent_gradient:  # the tensors themselves when .grad lets go of them
            self._ascent_grads = {
                id(p): p.grad if zero_grad else p.grad.clone()
                for p in every  # type: ignore[union-attr]
            }
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(
        self,
        zero_grad: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        """Restore w exactly and let the base optimizer step with the gradient at w + ε.

        The descent gradient is g' = ∇L(w + ε) as a variant's :meth:`_descent` hook leaves
        it (SAM: g' itself); ``max_grad_norm`` then clips it (unscaled) to this global
        2-norm, as ``torch.nn.utils.clip_grad_norm_`` would. With a ``grad_scaler`` this
        pass is unscaled once and the step goes through ``grad_scaler.step``, which skips
        the update if either pass overflowed; call ``grad_scaler.update()`` after.
        """
        if self._saved_weights is None:
            raise RuntimeError("second_step() called without first_step()")
        if self._perturbed_params:
            torch._foreach_copy_(self._perturbed_params, self._saved_weights)
        self._saved_weights, self._perturbed_params = None, []
        if _active(grad_scaler) is not None:
            # before unscaling: the scaler's overflow check then sees the first pass too
            self._forward_first_pass_overflow()
        try:
            self._descend(True, grad_scaler, max_grad_norm)
        finally:
            self._finite, self._ascent_grads = None, None
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def base_step(
        self,
        zero_grad: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        """A one-pass step: the base optimizer steps with the gradient now in ``.grad``
        (∇L(w)), through the same :meth:`_descent` hook, clipping and scaler as
        :meth:`second_step`. The off steps of ``interval=k`` are these."""
        if self._saved_weights is not None:
            raise RuntimeError("base_step() called between first_step() and second_step()")
        self._descend(False, grad_scaler, max_grad_norm)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _descend(
        self,
        sharpness_aware: bool,
        grad_scaler: torch.amp.GradScaler | None,
        max_grad_norm: float | None,
    ) -> None:
        ascent = self._ascent_grads if sharpness_aware else None
        groups: list[DescentGroup] = []

        def adjust() -> None:
            built = (DescentGroup(group, ascent) for group in self.param_groups)
            groups.extend(group for group in built if group.params)
            self._descent(groups, sharpness_aware)

        descend(self.base_optimizer, grad_scaler, max_grad_norm, adjust)
        self._after_descent(groups, sharpness_aware)
        # LR schedulers attached to this wrapper check that its step ran before theirs.
        self._opt_called = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """A whole SAM step; ``closure`` computes the loss and calls ``backward()``.

        As in davda54/sam the gradient at w may already be there (the caller ran
        ``loss.backward()``); if no parameter has a gradient (``.grad`` is None, as
        ``zero_grad()`` leaves it), the closure is called first to compute it. The
        gradients are cleared at the end. Returns the loss at w when computed here, else
        the loss at w + ε.
        """
        if closure is None:
            raise ValueError(
                "closure: a SAM-family step needs a closure that computes the loss and calls "
                "backward(), or use first_step()/second_step()"
            )
        closure = torch.enable_grad()(closure)
        loss = None
        if all(p.grad is None for group in self.param_groups for p in group["params"]):
            loss = closure()
        self.first_step(zero_grad=True)
        perturbed_loss = closure()
        # cleared, so the next step's gradient at w is computed afresh (a closure that
        # zeroes gradients itself would otherwise leave this pass's ones behind)
        self.second_step(zero_grad=True)
        return loss if loss is not None else perturbed_loss

    # --- hooks for variants ---------------------------------------------------------------

    def takes_two_passes(self, step: int) -> bool:
        """Whether the loop's step ``step`` (0-based) is a sharpness-aware one: every step
        for SAM; LookSAM's every k-th. The loops (``SharpnessAwareStep``, the pipeline's
        trainer, the integrations) ask this besides their own ``interval``; a step for
        which it is False is a :meth:`base_step`."""
        return True

    def _radius(self, group: dict[str, Any]) -> float | Tensor | None:
        """ρ of this step for ``group`` (None: the group's ``rho``); GSAM ties it to the
        learning rate."""
        return None

    def _after_descent(self, groups: list[DescentGroup], sharpness_aware: bool) -> None:
        """After the base optimizer's step (WSAM's decoupled sharpness update). The groups
        are those :meth:`_descent` saw; a step the GradScaler skipped must be skipped here
        too (a non-finite gradient tells it, without a host sync)."""

    def _descent(self, groups: list[DescentGroup], sharpness_aware: bool) -> None:
        """The descent gradient, formed in place in each group's ``grads``.

        Called after w is restored and the gradients are unscaled (a GradScaler), before
        clipping and the base optimizer's step: by :meth:`second_step`
        (``sharpness_aware``, ``grads`` holds g' = ∇L(w + ε) and, with
        ``keeps_ascent_gradient``, ``ascent_grads`` holds g = ∇L(w)) and by
        :meth:`base_step` (``grads`` holds ∇L(w)). SAM descends along g': nothing to do.
        On an fp16 step whose gradients overflowed they are inf or NaN here and the scaler
        skips the update; a variant that updates state of its own here keeps it with
        ``torch.where(self._finite, new, old)`` (``_finite`` is a device bool, or None
        without a scaler).
        """

    def _direction(self, group: AscentGroup) -> list[Tensor]:
        """The ascent direction d of one group: the gradient (Friendly-SAM overrides it)."""
        return group.grads

    def _epsilon(
        self,
        groups: list[AscentGroup],
        device: torch.device,
        stats: dict[str, Tensor] | None = None,
    ) -> list[Tensor]:
        """ε from the groups' directions: the filter's if there is one, else SAM/ASAM's.

        ``stats`` (diagnostics on only) goes to the filter: see :meth:`AscentFilter.epsilon`.
        """
        if self.zfilter is not None:
            if stats is None:
                return self.zfilter.epsilon(groups, device)
            return self.zfilter.epsilon(groups, device, stats=stats)
        return sam_epsilon(groups, [g.direction for g in groups], device)

    # --- diagnostics (record_diagnostics only) --------------------------------------------

    @staticmethod
    def _direction_norm(
        groups: list[AscentGroup], grad_norm: Tensor, device: torch.device, partial: bool
    ) -> Tensor:
        """‖d‖ of the perturbed tensors: ‖g‖ (already computed) unless a variant changed the
        direction or some tensors are not perturbed (``partial``)."""
        if not partial and all(group.direction is group.grads for group in groups):
            return grad_norm
        return global_norm([d for group in groups for d in group.direction], device)

    def _measure(
        self,
        groups: list[AscentGroup],
        epsilon: list[Tensor],
        grad_norm: Tensor,
        stats: dict[str, Tensor],
        device: torch.device,
    ) -> dict[str, Tensor]:
        """The values of :attr:`diagnostics`, from what the step computed anyway."""
        measured = {"grad_norm": grad_norm, "epsilon_norm": global_norm(epsilon, device)}
        if self.zfilter is None:  # d̃ = d: every entry kept, cos = 1
            measured["kept_fraction"] = torch.ones((), dtype=grad_norm.dtype, device=device)
            measured["cosine"] = torch.ones((), dtype=grad_norm.dtype, device=device)
        elif "kept" in stats and "filtered_norm" in stats:
            n = sum(d.numel() for group in groups for d in group.direction)
            measured["kept_fraction"] = stats["kept"].to(grad_norm.dtype) / n
            d_norm = stats["direction_norm"]
            # ⟨d̃, d⟩ = ‖d̃‖² since d̃ is d on a subset of entries: cos = ‖d̃‖/‖d‖ (1 for d = 0);
            # clamped against the last bit of rounding between the two norms
            ratio = stats["filtered_norm"].to(d_norm.dtype) / d_norm
            measured["cosine"] = torch.where(d_norm > 0, ratio, 1.0).clamp_(max=1.0)
        return measured

    # --- configuration and state ----------------------------------------------------------

    def _extra_defaults(self) -> dict[str, Any]:
        """Defaults of a subclass's own hyperparameters (Friendly-SAM's σ and λ)."""
        return {}

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate the sharpness-aware hyperparameters of one param group."""
        check_nonnegative("rho", group["rho"])
        check_nonnegative("eta", group["eta"])
        if not isinstance(group.get("perturb", True), bool):
            raise ValueError(f"perturb must be true or false, got {group['perturb']!r}")
        if self.zfilter is not None:
            self.zfilter.check_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to this optimizer and (shared) to its base optimizer."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _forward_first_pass_overflow(self) -> None:
        """Make the scaler skip this update if the first pass overflowed.

        The scaler only inspects the gradients it unscales; adding +inf to one gradient per
        device (0 when the first pass was finite) hands it that information without a host
        sync or private GradScaler state.
        """
        if self._finite is None:
            return
        seen: set[torch.device] = set()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.device not in seen:
                    seen.add(p.grad.device)
                    finite = self._finite.to(p.grad.device)
                    p.grad.add_(torch.where(finite, 0.0, float("inf")).to(p.grad.dtype))

    def state_dict(self) -> dict[str, Any]:
        """This optimizer's state and groups plus the base optimizer's state."""
        state = super().state_dict()
        state["base_state"] = self.base_optimizer.state_dict()["state"]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the groups stay shared with the base optimizer."""
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_state", {})
        super().load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(
            {"state": base_state, "param_groups": state_dict["param_groups"]}
        )
        self.param_groups = self.base_optimizer.param_groups
