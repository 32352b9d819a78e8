"""``zsharp.optim.step``: accumulation, clipping with AMP, ``interval``, BN, compile, no sync.

References are independent of the helper under test: the one-batch step written by hand
with the optimizers' documented two-pass API (itself checked against float64 references in
test_optim.py), and float64 steps computed from the equations (tests/reference.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import zsharp.optim as zo
from tests import reference as ref
from tests.cases import SHARPNESS_AWARE
from zsharp.optim.graphs import CaptureInspector
from zsharp.optim.step import SharpnessAwareStep, split_batch, two_pass_step

# key → create() name and arguments, every sharpness-aware optimizer of the registry; the
# ZSharp variants are the paper's and the released code's
OPTIMIZERS = SHARPNESS_AWARE


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model without BatchNorm: every sample's loss is independent of the others (its
    LayerNorm normalises each sample alone, and gives SAM-ON something to perturb)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 16))
    model.extend([nn.Tanh(), nn.Linear(16, 5)])
    return model.to(dtype)


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


def data(seed: int, n: int = 30, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


def images(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def make(key: str, model: nn.Module, **base: float) -> torch.optim.Optimizer:
    name, kwargs = OPTIMIZERS[key]
    return zo.create(name, zo.params_for(name, model), base="sgd", **{"lr": 0.1, **base, **kwargs})


def hand_step(
    model: nn.Module, opt: zo.SAM, x: torch.Tensor, y: torch.Tensor, step: int = 0
) -> None:
    """The one-batch step, as the optimizers' docstrings write it: two passes, or one where
    the optimizer's schedule says so (LookSAM between refreshes)."""
    F.cross_entropy(model(x), y).backward()
    if not opt.takes_two_passes(step):
        opt.base_step(zero_grad=True)
        return
    opt.first_step(zero_grad=True)
    with zo.disable_running_stats(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def count_forwards(model: nn.Module) -> list[int]:
    """A list whose length is the number of forward passes of ``model`` from now on."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def assert_same_weights(a: nn.Module, b: nn.Module, **tol: float) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)


# --- gradient accumulation ------------------------------------------------------------------


@pytest.mark.parametrize("key", list(OPTIMIZERS))
def test_accumulation_equals_the_full_batch_step(key: str) -> None:
    """4 micro-batches of 8, 8, 7, 7 samples (weighted by size) = the 30-sample step."""
    model, twin = mlp(1, torch.float64), mlp(1, torch.float64)
    opt = make(key, model, momentum=0.9, weight_decay=1e-3)
    twin_opt = make(key, twin, momentum=0.9, weight_decay=1e-3)
    step = SharpnessAwareStep(model, opt, F.cross_entropy, micro_batches=4)
    for seed in range(3):  # the later steps take F-SAM's moving-average path
        x, y = data(seed, dtype=torch.float64)
        loss = step(x, y)
        torch.testing.assert_close(loss, F.cross_entropy(twin(x), y).detach())
        hand_step(twin, twin_opt, x, y, step=seed)
        assert_same_weights(model, twin, rtol=1e-12, atol=1e-12)


def test_split_batch_keeps_structure() -> None:
    x, y = torch.arange(10), torch.arange(10) * 2
    parts = split_batch({"x": x, "pair": (x, y)}, 3)
    assert [len(p["x"]) for p in parts] == [4, 3, 3]
    assert torch.equal(parts[2]["pair"][1], y[7:])


def test_batchnorm_counts_each_micro_batch_once() -> None:
    """Running stats move on the first pass only: once per (micro-)batch, as at w."""
    model = bn_model(2)
    x, y = images(2)
    reference = copy.deepcopy(model)
    reference(x)  # one training-mode forward at w: what the running stats should see
    step = SharpnessAwareStep(model, make("zsharp", model), F.cross_entropy)
    step(x, y)
    bn, ref_bn = model[1], reference[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    SharpnessAwareStep(model, make("sam", model), F.cross_entropy, micro_batches=2)(x, y)
    assert int(bn.num_batches_tracked) == 3


# --- clipping and AMP -------------------------------------------------------------------------


def float64_clipped_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, variant: str | None, rho: float,
    lr: float, max_norm: float,
) -> list[torch.Tensor]:  # fmt: skip
    """w − lr·min(1, c/(‖g'‖ + 1e-6))·g', g' = ∇L(w + ε), ε from the equations, float64."""
    m = copy.deepcopy(model).double()
    params = list(m.parameters())

    def grads() -> list[torch.Tensor]:
        loss = F.cross_entropy(m(x.double()), y)
        return [g.detach() for g in torch.autograd.grad(loss, params)]

    w = [p.detach().clone() for p in params]
    g = grads()
    eps = ref.epsilon(
        [t.numpy() for t in g], [t.numpy() for t in w], [rho] * len(w), variant=variant
    )
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p.add_(torch.from_numpy(e))
    g2 = grads()
    norm = math.sqrt(sum(float((t**2).sum()) for t in g2))
    assert norm > max_norm, "the test must clip"
    coef = min(1.0, max_norm / (norm + 1e-6))
    return [wi - lr * coef * gi for wi, gi in zip(w, g2, strict=True)]


@pytest.mark.parametrize("key", ["sam", "zsharp", "zsharp-official"])
@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad-scaler"])
def test_clipped_step_matches_float64(key: str, scaled: bool) -> None:
    """Clipping of the descent gradient; with a GradScaler each pass is unscaled once."""
    model = mlp(3)
    x, y = data(3)
    variant = OPTIMIZERS[key][1].get("variant")
    expected = float64_clipped_step(model, x, y, variant, rho=0.05, lr=0.1, max_norm=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
    step = SharpnessAwareStep(
        model, make(key, model), F.cross_entropy, grad_scaler=scaler, max_grad_norm=0.05
    )
    step(x, y)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)
    if scaler is not None:
        assert scaler.get_scale() == 2.0**12  # no overflow, no growth yet


def test_clipped_base_step_matches_float64() -> None:
    """``interval``'s one-pass steps clip too (ε = 0: the reference with ρ = 0)."""
    model = mlp(4)
    x, y = data(4)
    expected = float64_clipped_step(model, x, y, None, rho=0.0, lr=0.1, max_norm=0.05)
    opt = make("zsharp", model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    step = SharpnessAwareStep(
        model, opt, F.cross_entropy, grad_scaler=scaler, max_grad_norm=0.05, interval=2
    )
    step.steps = 1  # the next call is an off step
    step(x, y)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def overflowing_loss(at_call: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """cross_entropy, times +inf on call number ``at_call`` (0: first pass, 1: second)."""
    calls = [0]

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(outputs, targets)
        if calls[0] == at_call:
            loss = loss * float("inf")
        calls[0] += 1
        return loss

    return loss_fn


@pytest.mark.parametrize("key", list(OPTIMIZERS))
@pytest.mark.parametrize("at_call", [0, 1], ids=["first-pass", "second-pass"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "clip"])
def test_overflow_in_either_pass_skips_the_step(key: str, at_call: int, clip: float | None) -> None:
    model = mlp(5)
    x, y = data(5)
    opt = make(key, model, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    step = SharpnessAwareStep(
        model, opt, overflowing_loss(at_call), grad_scaler=scaler, max_grad_norm=clip
    )
    step(x, y)
    assert not opt.perturbed
    for p, w in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, w)
    assert not any("momentum_buffer" in s for s in opt.base_optimizer.state.values())
    assert scaler.get_scale() == 2.0**11
    step(x, y)  # the next, finite step does move the weights
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), before, strict=True))
    assert scaler.get_scale() == 2.0**11


def test_overflow_in_a_base_step_skips_it() -> None:
    model = mlp(6)
    x, y = data(6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    step = SharpnessAwareStep(
        model, make("zsharp", model), overflowing_loss(0), grad_scaler=scaler, interval=2
    )
    step.steps = 1
    before = [p.detach().clone() for p in model.parameters()]
    step(x, y)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before, strict=True))
    assert scaler.get_scale() == 2.0**11


def test_autocast_dtype_runs_the_forward_passes_in_it() -> None:
    model = mlp(7)
    dtypes: list[torch.dtype] = []
    model[0].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    step = SharpnessAwareStep(
        model, make("zsharp", model), F.cross_entropy, autocast=torch.bfloat16
    )
    loss = step(*data(7))
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --- interval -------------------------------------------------------------------------------


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_interval_makes_every_kth_step_two_pass(micro_batches: int) -> None:
    model = mlp(8)
    forwards = count_forwards(model)
    step = SharpnessAwareStep(
        model, make("zsharp", model), F.cross_entropy, interval=3, micro_batches=micro_batches
    )
    per_step = []
    for seed in range(7):
        before = len(forwards)
        step(*data(seed))
        per_step.append((len(forwards) - before) // micro_batches)
    assert per_step == [2, 1, 1, 2, 1, 1, 2]


def test_interval_off_steps_are_base_steps() -> None:
    """Steps 0 and 2 are ZSharp's, step 1 the base optimizer's (SGD with momentum)."""
    model, twin = mlp(9), mlp(9)
    opt, twin_opt = make("zsharp", model, momentum=0.9), make("zsharp", twin, momentum=0.9)
    step = SharpnessAwareStep(model, opt, F.cross_entropy, interval=2)
    for seed in range(3):
        x, y = data(seed)
        step(x, y)
        if seed % 2 == 0:
            hand_step(twin, twin_opt, x, y)
        else:
            F.cross_entropy(twin(x), y).backward()
            twin_opt.base_optimizer.step()
            twin_opt.zero_grad()
        assert_same_weights(model, twin, rtol=1e-6, atol=1e-7)
    assert step.state_dict() == {"steps": 3}


def test_plain_optimizer_takes_one_pass_steps() -> None:
    model, twin = mlp(10), mlp(10)
    forwards = count_forwards(model)
    opt = zo.create("adam", model.parameters(), lr=1e-2)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    step = SharpnessAwareStep(model, opt, F.cross_entropy)
    for seed in range(2):
        x, y = data(seed)
        step(x, y)
        twin_opt.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        twin_opt.step()
    assert len(forwards) == 2
    assert_same_weights(model, twin)


# --- the step's contract ------------------------------------------------------------------


@pytest.mark.parametrize("key", list(OPTIMIZERS))
def test_no_host_sync_in_a_step(key: str) -> None:
    """Every sharpness-aware optimizer of the registry (both ZSharp variants), diagnostics
    on, through the whole step (2 micro-batches, clipping) and the one-pass step of
    ``interval``: not one operation that syncs with the host, draws random numbers or copies
    between host and device, as the inspector of CUDA-graph capture sees them. SGD is the
    base: torch's Adam reads its CPU step count with .item() (no device sync, but a dispatch
    mode cannot tell it apart on a CPU)."""
    model = mlp(11)
    name, kwargs = OPTIMIZERS[key]
    optimizer = zo.create(
        name,
        zo.params_for(name, model),
        base="sgd",
        lr=0.1,
        momentum=0.9,
        diagnostics=True,
        **kwargs,
    )
    step = SharpnessAwareStep(
        model, optimizer, F.cross_entropy, micro_batches=2, max_grad_norm=1.0, interval=2
    )
    for seed in range(3):  # two-pass, one-pass, two-pass (F-SAM's moving-average path)
        x, y = data(seed)
        with CaptureInspector() as inspector:
            step(x, y)
        assert inspector.found == [], (seed, inspector.found)
    assert all(torch.isfinite(v) for v in optimizer.diagnostics.values())


def test_the_inspector_finds_a_host_sync() -> None:
    with CaptureInspector() as inspector:
        torch.ones(3).sum().item()
    assert inspector.found and "_local_scalar_dense" in inspector.found[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0}, "interval"),
        ({"micro_batches": 0}, "micro_batches"),
        ({"ddp": "async"}, "ddp"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ],
)
def test_bad_arguments_name_the_key(kwargs: dict, message: str) -> None:
    model = mlp(12)
    with pytest.raises(ValueError, match=message):
        SharpnessAwareStep(model, make("sam", model), F.cross_entropy, **kwargs)


def test_more_micro_batches_than_samples_is_an_error() -> None:
    model = mlp(12)
    step = SharpnessAwareStep(model, make("sam", model), F.cross_entropy, micro_batches=4)
    with pytest.raises(ValueError, match="micro_batches=4"):
        step(*data(0, n=3))


def test_two_pass_step_needs_a_pass() -> None:
    model = mlp(12)
    with pytest.raises(ValueError, match="passes"):
        two_pass_step(make("sam", model), model, [])


# --- torch.compile ------------------------------------------------------------------------


@pytest.mark.parametrize("bn", [False, True], ids=["mlp", "batchnorm"])
def test_compiled_model_compiles_once_per_pass_kind(bn: bool) -> None:
    """No recompilation from step to step; BatchNorm's frozen second pass is one more graph.

    ``disable_running_stats`` flips ``track_running_stats``, a guarded attribute: a model
    with BatchNorm has two graphs (first pass, second pass), both built in the first step
    and reused after; a model without BatchNorm has one graph for both passes.
    """
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, twin = (bn_model(13), bn_model(13)) if bn else (mlp(13), mlp(13))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    step = SharpnessAwareStep(compiled, make("zsharp", model), F.cross_entropy)
    twin_opt = make("zsharp", twin)
    frames = []
    for seed in range(3):
        x, y = images(seed) if bn else data(seed)
        step(x, y)
        hand_step(twin, twin_opt, x, y)
        frames.append(counter.frame_count)
    assert frames == [2, 2, 2] if bn else [1, 1, 1]
    assert_same_weights(model, twin, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
