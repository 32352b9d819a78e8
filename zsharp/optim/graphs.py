"""A CUDA-graphed training step: the whole step captured once, replayed for every batch.

Small models (ResNet-20: 0.27M parameters, batch 256) leave an H100 idle: a SAM-family
step launches about a thousand small kernels (two forward and backward passes, the
Z-score filter, ε, the base optimizer), and the CPU cannot launch them as fast as the GPU
runs them. :class:`GraphedStep` captures the caller's eager step function (both passes,
the optimizer's ``first_step``/``second_step`` or ``step``) in a CUDA graph and replays it,
one launch per step. The LR scheduler runs outside the graph and writes the learning rate
into a tensor the graph reads (:func:`tensor_lr_`).

Exactness, by construction: the graph replays the kernels the eager step function
launched at capture, on the same tensors, so a graphed run equals an eager run *of the
same optimizer configuration* (a tensor learning rate, a fused or capturable base
optimizer: :func:`graph_base_kwargs`). Nothing is computed twice and nothing is skipped:

* the first ``warmup`` calls of each kind of step (its variant and input shapes) are real
  training steps, run eagerly on a side stream (what the capture recipe of PyTorch's CUDA
  semantics notes asks for: lazy optimizer state, cuDNN/cuBLAS handles and workspaces are
  created outside the capture, on the stream the capture then uses);
* the next call of that kind captures the step function, then replays the graph once:
  capturing records kernels without running them, so that batch is trained by the replay;
* every later call copies the batch into the graph's static input buffers and replays.

Python runs the step function once, at capture. Whatever Python decides there is frozen:
which pass structure runs (pass it as a ``variant``: a sharpness-aware and a base step,
as ``sam_interval`` alternates, are two graphs), every hyperparameter but the learning
rate, and which tensors Python attributes point to. So the step function must take every
decision that changes between steps from its ``variant`` arguments, return every tensor
the caller reads (an attribute such as ``SAM.diagnostics`` rebound by the step keeps
pointing at the tensors of the call that last ran eagerly or captured), and leave the
scheduler and any Python counter to the caller.

Refused, with a one-line ValueError (:func:`check_graphable`):

* ``capture=True`` off a CUDA device (``capture=False`` runs the same code eagerly: the
  static buffers, the variants, the warm-up and the checks, without a graph);
* fp16 with an active GradScaler: ``GradScaler.step`` decides on the host whether to skip
  the update (``found_inf.item()``), a host sync a graph cannot hold;
* ``torch.compile`` together with graphs (``mode="reduce-overhead"`` is the compiler's
  own CUDA graphs);
* DistributedDataParallel (its buckets are rebuilt after the first steps and its
  all-reduce would be captured);
* modules that draw random numbers in the step (dropout with p > 0, stochastic depth):
  PyTorch's default CUDA generator is graph-safe (each replay advances its Philox offset),
  but equality with eager has not been measured on a GPU here; ``allow_random=True``
  lifts the refusal;
* a learning rate that is a Python float (the graph would keep it forever), or a tensor
  that is not float32 on the parameters' device (the fused CUDA kernels read it as
  ``float*``);
* torch's SGD without ``fused=True`` (its foreach and for-loop steps read a tensor
  learning rate with ``.item()``), Adam/AdamW without ``capturable=True`` when capturing
  (their step count is a host value otherwise), or neither fused nor capturable.

And at run time, on the last warm-up call of each kind of step, the step runs under a
dispatch-mode inspector that lists the operations a capture cannot hold: host syncs
(``.item()``, ``nonzero``, boolean-mask indexing, ``unique``, …), random draws, and
copies between host and device. Any found fails that call with a ValueError naming the
operation (after the step completed, so the model is not left half-updated). On a CPU
this is the check of capturability that can run without a GPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "CaptureInspector",
    "GraphedStep",
    "check_graphable",
    "graph_base_kwargs",
    "tensor_lr_",
]

# The fused CUDA optimizer kernels read a tensor learning rate as `float*`
# (FusedSgdKernel.cu, fused_adam_impl.cu: lr.data_ptr<float>()).
LR_DTYPE = torch.float32

StepFn = Callable[..., Sequence[Tensor]]

# aten ops (overload packets) that copy a device value to the host or size a result by
# data: inside a capture they fail ("operation not permitted when stream is capturing")
_SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "nonzero",
        "masked_select",
        "equal",
        "allclose",
        "unique",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "tolist",
    }
)
# aten ops that draw from a random generator
_RANDOM_OPS = frozenset(
    {
        "bernoulli",
        "bernoulli_",
        "native_dropout",
        "_fused_dropout",
        "rand",
        "rand_like",
        "randn",
        "randn_like",
        "randint",
        "randint_like",
        "randperm",
        "normal",
        "normal_",
        "uniform_",
        "exponential_",
        "geometric_",
        "cauchy_",
        "log_normal_",
        "random_",
        "multinomial",
        "poisson",
        "binomial",
        "rrelu_with_noise",
        "rrelu_with_noise_",
        "_standard_gamma",
        "_sample_dirichlet",
    }
)
_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


# --- the optimizer's part -------------------------------------------------------------------


def graph_base_kwargs(base: str | type[Optimizer], device: torch.device | str) -> dict[str, Any]:
    """Arguments that make base optimizer ``base`` capturable with a tensor learning rate.

    ``sgd``: ``fused=True`` (its other implementations read a tensor lr with ``.item()``).
    ``adam``/``adamw``: ``fused=True``, and ``capturable=True`` on CUDA (their step count
    then lives on the device; torch refuses capturable on a CPU, where fused suffices).
    Pass them to :func:`zsharp.optim.create` with the base optimizer's other arguments.
    """
    name = base.lower() if isinstance(base, str) else base.__name__.lower()
    if name == "sgd":
        return {"fused": True}
    if name in ("adam", "adamw"):
        cuda = torch.device(device).type == "cuda"
        return {"fused": True, **({"capturable": True} if cuda else {})}
    raise ValueError(
        f"graphs: base optimizer {name!r} has no step known to be capturable with a tensor "
        "learning rate; use sgd, adam or adamw"
    )


def tensor_lr_(optimizer: Optimizer) -> None:
    """Make every param group's ``lr`` a 0-d float32 tensor on its parameters' device.

    Call it *after* building the LR scheduler: the scheduler then keeps its base learning
    rates as Python floats, computes each step's rate in float64 as before, and writes it
    into the tensor with ``fill_`` (a device kernel, no host sync). The tensor's identity
    never changes afterwards, so a graph captured once reads every later rate. A wrapper
    and its base optimizer share their groups (``zsharp.optim.SAM``): one call covers both.
    Reading the rate for a log is ``float(group["lr"])`` (a host sync: once per epoch).
    """
    for group in optimizer.param_groups:
        lr = group["lr"]
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        if isinstance(lr, Tensor):
            group["lr"] = lr.detach().to(device=device, dtype=LR_DTYPE).reshape(())
        else:
            group["lr"] = torch.tensor(float(lr), dtype=LR_DTYPE, device=device)


def _optimizers(optimizer: Optimizer) -> list[Optimizer]:
    """The optimizer and, for a wrapper (SAM and its family), its base optimizer."""
    base = getattr(optimizer, "base_optimizer", None)
    return [optimizer, base] if isinstance(base, Optimizer) else [optimizer]


# --- refusals -------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    raise ValueError("graphs: the model has no parameters")


def check_graphable(
    model: nn.Module,
    optimizer: Optimizer,
    *,
    capture: bool,
    grad_scaler: torch.amp.GradScaler | None = None,
    compiled: bool = False,
    allow_random: bool = False,
) -> None:
    """Raise a one-line ValueError for what a captured step cannot reproduce exactly.

    The checks (see the module docstring) apply with ``capture=False`` too, except the
    device's, so that the CPU path runs under the constraints of the GPU path.
    """
    device = _device_of(model)
    if capture and device.type != "cuda":
        raise ValueError(
            f"graphs: CUDA graphs need a CUDA device, but the model is on {device} "
            "(capture=False runs the same step without a graph)"
        )
    if grad_scaler is not None and grad_scaler.is_enabled():
        raise ValueError(
            "graphs: fp16 with a GradScaler cannot be captured: GradScaler.step decides on "
            "the host whether to skip the update (found_inf.item()); use bf16 or fp32"
        )
    if compiled:
        raise ValueError(
            "graphs: torch.compile and CUDA graphs together are not supported; choose one "
            "(compile's mode='reduce-overhead' captures CUDA graphs of its own)"
        )
    if isinstance(model, nn.parallel.DistributedDataParallel) or (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise ValueError(
            "graphs: DistributedDataParallel is not supported (its gradient buckets are "
            "rebuilt after the first steps and its all-reduce would be captured)"
        )
    if not allow_random:
        for name, module in model.named_modules():
            p = getattr(module, "p", None) if isinstance(module, _RANDOM_MODULES) else None
            p = getattr(module, "drop_prob", p)  # timm's DropPath (stochastic depth)
            if isinstance(p, (int, float)) and p > 0:
                raise ValueError(
                    f"graphs: module {name or '(root)'!r} ({type(module).__name__}, p={p}) "
                    "draws random numbers in the step, and a captured step's draws are not "
                    "tested equal to eager's; use dropout 0 or graphs: false"
                )
    for opt in _optimizers(optimizer):
        _check_optimizer(opt, device, capture)


def _check_optimizer(optimizer: Optimizer, device: torch.device, capture: bool) -> None:
    kind = type(optimizer).__name__
    for index, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            raise ValueError(
                f"graphs: param group {index}'s lr is a Python number, which a captured step "
                "would keep forever; call zsharp.optim.graphs.tensor_lr_(optimizer) after building "
                "the LR scheduler"
            )
        if lr.dtype != LR_DTYPE or lr.device != device or lr.dim() != 0:
            raise ValueError(
                f"graphs: param group {index}'s lr must be a 0-d float32 tensor on {device}, "
                f"got {lr.dtype} of shape {tuple(lr.shape)} on {lr.device} "
                "(zsharp.optim.graphs.tensor_lr_ makes one)"
            )
        if isinstance(optimizer, torch.optim.SGD) and not group.get("fused"):
            raise ValueError(
                f"graphs: {kind} needs fused=True: its foreach and for-loop steps read a "
                "tensor lr with .item() (a host sync); zsharp.optim.graphs.graph_base_kwargs"
            )
        if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            if capture and not group.get("capturable"):
                raise ValueError(
                    f"graphs: {kind} needs capturable=True to be captured (its step count "
                    "stays on the host otherwise); zsharp.optim.graphs.graph_base_kwargs"
                )
            if not (group.get("capturable") or group.get("fused")):
                raise ValueError(
                    f"graphs: {kind} needs fused=True (or capturable=True on CUDA): it "
                    "reads its step count with .item() otherwise; "
                    "zsharp.optim.graphs.graph_base_kwargs"
                )


# --- the run-time inspection ----------------------------------------------------------------


class CaptureInspector(TorchDispatchMode):
    """Records the operations run under it that a CUDA graph capture cannot hold.

    ``found`` lists them, one string each: host syncs (``.item()``, ``nonzero``,
    boolean-mask indexing, ``unique``, …), random draws, and copies between the host and a
    CUDA device. A dispatch mode sees every aten operation, so this runs on a CPU too:
    ``with CaptureInspector() as inspector: step(...)``, then ``inspector.found == []``
    proves the step syncs with nothing (what :class:`GraphedStep` checks on its last
    warm-up call, and the test suite checks of every optimizer's step).
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in _SYNC_OPS:
            self.found.append(f"host sync {func}")
        elif name in _RANDOM_OPS:
            self.found.append(f"random draw {func}")
        elif name in ("index", "index_put", "index_put_") and _bool_index(args):
            self.found.append(f"host sync {func} with a boolean mask")
        elif name in ("_to_copy", "copy_") and _crosses_host(name, args, kwargs):
            self.found.append(f"host-device copy {func}")
        return func(*args, **kwargs)


def _bool_index(args: Sequence[Any]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


def _crosses_host(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """A copy between the host and a CUDA device (a 0-d CPU source is a wrapped scalar)."""
    source = args[1] if name == "copy_" else args[0]
    if name == "copy_":
        target = args[0].device
    else:
        target = torch.device(kwargs.get("device") or source.device)
    if not isinstance(source, Tensor) or source.device == target:
        return False
    cuda = "cuda" in (source.device.type, target.type)
    return cuda and not (source.device.type == "cpu" and source.dim() == 0)


# --- the graphed step -----------------------------------------------------------------------


@contextlib.contextmanager
def _side_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Run the block on ``stream`` (None: where it is), ordered after the current stream's
    work and before its next work: every tensor crossing the streams is then safe."""
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


def _signature(t: Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), t.dtype, t.device)


@dataclass
class _Entry:
    """One kind of step, captured: its graph (None without capture) and static outputs."""

    graph: torch.cuda.CUDAGraph | None
    outputs: tuple[Tensor, ...]
    inputs: tuple[Tensor, Tensor]
    variant: tuple[Hashable, ...]


class GraphedStep:
    """A training step captured once per kind of step as a CUDA graph, replayed per batch.

    Args:
        step_fn: the eager step, ``step_fn(x, y, *variant) -> tuple of tensors``: both
            passes, the optimizer's step and ``zero_grad`` (gradients None at the end, as
            ``first_step``/``second_step(zero_grad=True)`` leave them), but not the LR
            scheduler. It is called with static input buffers, never with the caller's
            tensors. What it returns (e.g. the loss and the number correct) must be
            tensors.
        model: the model the step trains (its device, and the checks).
        optimizer: the step's optimizer (its learning-rate tensors are watched, and a
            ``load_state_dict`` into it drops the graphs so that they are captured again).
        capture: capture CUDA graphs (needs a CUDA device); False runs the identical
            bookkeeping and checks eagerly, which is what a CPU can test.
        warmup: eager steps of each kind before its capture (≥ 1: the optimizer's lazy
            state must exist before a capture). They are real training steps.
        clone_outputs: return copies of the graph's static outputs (False: the static
            outputs themselves, overwritten by the next replay of the same kind).
        grad_scaler, compiled, allow_random: see :func:`check_graphable`.

    Call ``step(x, y, *variant)`` once per batch. ``variant`` (hashable Python values)
    selects the kind of step together with the inputs' shapes and dtypes: e.g. ``True``
    for a sharpness-aware step and ``False`` for the base optimizer's step of
    ``sam_interval`` > 1; the last, shorter batch of an epoch is a kind of its own. Each
    kind is captured after its own ``warmup`` eager calls, and graphs share one memory
    pool (replays are serialised on the caller's stream).

    ``counts`` says how many calls ran eagerly (``eager``), were captured (``captures``)
    and replayed (``replays``; without capture: run on the static buffers after the
    "capture").
    """

    def __init__(
        self,
        step_fn: StepFn,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        capture: bool,
        warmup: int = 2,
        clone_outputs: bool = True,
        grad_scaler: torch.amp.GradScaler | None = None,
        compiled: bool = False,
        allow_random: bool = False,
    ) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"graphs: warmup must be an integer >= 1, got {warmup!r}")
        check_graphable(
            model,
            optimizer,
            capture=capture,
            grad_scaler=grad_scaler,
            compiled=compiled,
            allow_random=allow_random,
        )
        self.step_fn = step_fn
        self.model, self.optimizer = model, optimizer
        self.capture, self.warmup, self.clone_outputs = capture, warmup, clone_outputs
        self.device = _device_of(model)
        # warm-up and capture share one side stream: cuBLAS/cuDNN handles and workspaces
        # are cached per stream, and creating one inside a capture fails
        self._stream = torch.cuda.Stream(self.device) if capture else None
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.counts = {"eager": 0, "captures": 0, "replays": 0}
        self._inputs: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        self._entries: dict[tuple[Any, ...], _Entry] = {}
        self._warm: Counter[tuple[Any, ...]] = Counter()
        self._lr_tensors: list[Tensor] = []
        self._hyper: list[dict[str, Any]] = []
        for opt in _optimizers(optimizer):  # a loaded state replaces the tensors a graph uses
            opt.register_load_state_dict_post_hook(lambda _opt: self.reset())

    # --- the public part

    def __call__(self, x: Tensor, y: Tensor, *variant: Hashable) -> tuple[Tensor, ...]:
        """One training step on (x, y); returns the step function's tensors."""
        self._check_unchanged()
        if getattr(self.optimizer, "perturbed", False):
            raise RuntimeError("graphs: the optimizer is between first_step and second_step")
        key = (variant, _signature(x), _signature(y))
        entry = self._entries.get(key)
        if entry is not None:
            return self._replay(entry, x, y)
        static_x, static_y = self._static_inputs(x, y)
        if self._warm[key] < self.warmup:
            self._warm[key] += 1
            return self._eager(static_x, static_y, variant, inspect=self._warm[key] == self.warmup)
        entry = self._capture(static_x, static_y, variant)
        self._entries[key] = entry
        return self._replay(entry, x, y)

    @property
    def graphs(self) -> int:
        """How many kinds of step are captured."""
        return len(self._entries)

    def reset(self) -> None:
        """Drop every graph and static buffer: each kind of step warms up and is captured
        again. Called on the optimizer's ``load_state_dict``; call it after replacing any
        other tensor the step uses (``model.to(...)``, parameters assigned anew)."""
        self._entries.clear()
        self._inputs.clear()
        self._warm.clear()
        self._lr_tensors, self._hyper = [], []

    # --- the parts

    def _static_inputs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The static buffers of these shapes, holding a copy of (x, y).

        ``empty_like`` keeps the memory format (channels-last batches stay so)."""
        shapes = (_signature(x), _signature(y))
        buffers = self._inputs.get(shapes)
        if buffers is None:
            buffers = self._inputs[shapes] = (torch.empty_like(x), torch.empty_like(y))
        buffers[0].copy_(x)
        buffers[1].copy_(y)
        return buffers

    def _run(self, x: Tensor, y: Tensor, variant: tuple[Hashable, ...]) -> tuple[Tensor, ...]:
        outputs = self.step_fn(x, y, *variant)
        if not isinstance(outputs, (tuple, list)) or not all(
            isinstance(t, Tensor) for t in outputs
        ):
            raise TypeError(
                f"graphs: the step function must return a tuple of tensors, got {outputs!r}"
            )
        return tuple(outputs)

    def _eager(
        self, x: Tensor, y: Tensor, variant: tuple[Hashable, ...], inspect: bool
    ) -> tuple[Tensor, ...]:
        """A real step, run eagerly (on the side stream when capturing), inspected on the
        last warm-up call of its kind."""
        self.counts["eager"] += 1
        inspector = CaptureInspector()
        with _side_stream(self._stream):
            if inspect:
                with inspector:
                    outputs = self._run(x, y, variant)
            else:
                outputs = self._run(x, y, variant)
        if inspector.found:
            kinds = Counter(inspector.found)
            first, more = inspector.found[0], len(kinds) - 1
            raise ValueError(
                f"graphs: the step cannot be captured: it runs a {first}"
                + (f" (and {more} other kind{'s' * (more > 1)} of operation)" if more else "")
            )
        return outputs

    def _capture(self, x: Tensor, y: Tensor, variant: tuple[Hashable, ...]) -> _Entry:
        """Capture the step function on the static inputs (nothing runs: the caller
        replays the graph once to train on this batch)."""
        self.counts["captures"] += 1
        if not self._lr_tensors:
            self._remember_hyperparameters()
        if not self.capture:
            return _Entry(None, (), (x, y), variant)
        graph = torch.cuda.CUDAGraph()
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            outputs = self._run(x, y, variant)
        return _Entry(graph, outputs, (x, y), variant)

    def _replay(self, entry: _Entry, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        self.counts["replays"] += 1
        static_x, static_y = entry.inputs
        static_x.copy_(x)
        static_y.copy_(y)
        if entry.graph is None:  # no capture: the same step, eagerly, on the static buffers
            return self._run(static_x, static_y, entry.variant)  # (new tensors each call)
        entry.graph.replay()
        if self.clone_outputs:
            return tuple(t.clone() for t in entry.outputs)
        return entry.outputs

    def _remember_hyperparameters(self) -> None:
        """What a graph freezes: the lr tensors' identity and every other hyperparameter."""
        self._lr_tensors = [
            g["lr"] for opt in _optimizers(self.optimizer) for g in opt.param_groups
        ]
        self._hyper = [_hyperparameters(g) for g in self.optimizer.param_groups]

    def _check_unchanged(self) -> None:
        if not self._lr_tensors:
            return
        groups = self.optimizer.param_groups
        lrs = [g["lr"] for opt in _optimizers(self.optimizer) for g in opt.param_groups]
        if len(lrs) != len(self._lr_tensors) or any(
            a is not b for a, b in zip(lrs, self._lr_tensors, strict=False)
        ):
            raise RuntimeError(
                "graphs: a param group's lr tensor was replaced after the capture; update it "
                "in place (the LR scheduler does) or call reset()"
            )
        for index, (group, frozen) in enumerate(zip(groups, self._hyper, strict=True)):
            now = _hyperparameters(group)
            if now != frozen:
                key = next(k for k in frozen.keys() | now.keys() if frozen.get(k) != now.get(k))
                raise RuntimeError(
                    f"graphs: param group {index}'s {key!r} changed from {frozen.get(key)!r} to "
                    f"{now.get(key)!r} after the capture, which keeps the old value; only lr "
                    "may change (in place), or call reset()"
                )


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in group.items()
        if k not in ("params", "lr", "param_names") and not isinstance(v, Tensor)
    }
