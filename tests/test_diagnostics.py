"""``optimizer.diagnostics``: ‖g‖, ‖ε‖, the kept fraction and cos∠(d̃, d) of the last ascent.

Every value is checked against the float64 transcription in tests/reference.py on a small
model with every kind of tensor (conv with bias, BatchNorm, linear; eight sizes from 3 to
1440 entries), for every sharpness-aware optimizer of the registry, with param groups,
bf16 parameters and a GradScaler. Off (the default) the step runs the same operations as
before and stores nothing; on, it changes no weight and never syncs with the host.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import zsharp.optim as zo
from tests import reference as ref
from tests.cases import SHARPNESS_AWARE

KEYS = ("grad_norm", "epsilon_norm", "kept_fraction", "cosine")
# (registry name, ZSharp variant or None) of every sharpness-aware optimizer
CASES = [(name, kwargs.get("variant")) for name, kwargs in SHARPNESS_AWARE.values()]


def small_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Conv 3→4 (108 + 4), BatchNorm (4 + 4), Linear 144→10 (1440 + 10), Linear 10→3."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Tanh(),  # (no exact zeros in the gradients, hence no ties in |z|)
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
        nn.Tanh(),
        nn.Linear(10, 3),
    )
    return model.to(dtype)


def backward(model: nn.Module, seed: int, scaler: torch.amp.GradScaler | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 3, 8, 8, generator=g).to(dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    loss = F.cross_entropy(model(x).float(), y)
    (loss if scaler is None else scaler.scale(loss)).backward()


def as_numpy(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().double().numpy() for t in tensors]


def kwargs_for(name: str, variant: str | None) -> dict[str, Any]:
    return {"variant": variant} if variant is not None else {}


def expected(
    opt: zo.SAM, model: nn.Module, grads: list[np.ndarray], directions: list[np.ndarray]
) -> dict[str, float]:
    """The reference's diagnostics for this optimizer's groups and settings (``grads`` and
    ``directions`` in the groups' order): ‖g‖ over every tensor, the rest over the
    perturbed ones (SAM-ON's norm layers), with the variant's guard."""
    rhos, adaptive, kept, i = [], [], [], 0
    for group in opt.param_groups:
        n = len(group["params"])
        if group.get("perturb", True):
            kept += range(i, i + n)
            rhos += [float(group["rho"])] * n
            adaptive += [bool(group["adaptive"])] * n
        i += n
    weights = as_numpy(params_of(opt))
    group = opt.param_groups[0]
    return ref.diagnostics(
        grads,
        [directions[i] for i in kept],
        [weights[i] for i in kept],
        rhos,
        variant=getattr(opt, "variant", None),
        percentile=float(group.get("percentile", 95.0)),
        adaptive=adaptive,
        eta=float(group["eta"]),
        eps=opt.norm_eps,
    )


def assert_matches(
    measured: dict[str, torch.Tensor], want: dict[str, float], n: int, rtol: float = 1e-5
) -> None:
    assert set(measured) == set(KEYS)
    for key in ("grad_norm", "epsilon_norm", "cosine"):
        np.testing.assert_allclose(measured[key].item(), want[key], rtol=rtol, err_msg=key)
    # the count itself: closer than half an entry to the reference's
    assert abs(measured["kept_fraction"].item() - want["kept_fraction"]) < 0.5 / n
    assert 0.0 <= measured["cosine"].item() <= 1.0


def params_of(opt: zo.SAM) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


# --- against the float64 reference ---------------------------------------------------------


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_every_optimizer_matches_the_float64_reference(name: str, variant: str | None) -> None:
    """Three steps (Friendly-SAM's moving average in use from the second on)."""
    model = small_model(1)
    kwargs: dict[str, Any] = {"sigma": 0.7, "lmbda": 0.8} if "fsam" in name else {}
    kwargs.update(kwargs_for(name, variant))
    opt = zo.create(name, zo.params_for(name, model), lr=0.05, diagnostics=True, **kwargs)
    n = sum(p.numel() for p in model.parameters())
    grads_per_step: list[list[np.ndarray]] = []
    average: list[np.ndarray] = []  # VaSSO's d: d_1 = g_1, then (1 − θ)d + θg
    for step in range(3):
        backward(model, 10 + step)
        grads = as_numpy([p.grad for p in params_of(opt)])
        grads_per_step.append(grads)
        if "fsam" in name:
            directions = ref.friendly_directions(grads_per_step, 0.7, 0.8)[-1]
        elif "vasso" in name:
            theta = float(opt.param_groups[0]["theta"])
            if not average:
                average = [x.copy() for x in grads]
            else:
                average = [(1 - theta) * a + theta * b for a, b in zip(average, grads, strict=True)]
            directions = average
        else:
            directions = grads
        want = expected(opt, model, grads, directions)
        opt.first_step(zero_grad=True)
        assert_matches(opt.diagnostics, want, n)
        backward(model, 10 + step)
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("name", ["sam", "zsharp"])
@pytest.mark.parametrize("percentile", [0.0, 50.0, 90.0, 95.0, 99.9])
def test_paper_epsilon_norm_is_rho_and_kept_fraction_is_the_rules(
    name: str, percentile: float
) -> None:
    """‖ε‖ = ρ (ε = ρ·d̃/‖d̃‖) and Σ|m|/n = Σ_ℓ k_ℓ / Σ_ℓ n_ℓ, k_ℓ = ⌈n_ℓ(100 − p)/100⌉,
    counted from an independent float64 Z-score over all eight tensor sizes."""
    model = small_model(2)
    kwargs = {"percentile": percentile} if name == "zsharp" else {}
    opt = zo.create(name, zo.params_for(name, model), lr=0.1, rho=0.07, diagnostics=True, **kwargs)
    backward(model, 20)
    grads = as_numpy([p.grad for p in model.parameters()])
    opt.first_step()
    measured = opt.diagnostics
    np.testing.assert_allclose(measured["epsilon_norm"].item(), 0.07, rtol=1e-6)
    n = sum(g.size for g in grads)
    if name == "sam":
        assert measured["kept_fraction"].item() == 1.0 and measured["cosine"].item() == 1.0
        return
    rule = sum(ref.keep_count_paper(g.size, percentile) for g in grads)
    z_count = sum(int(ref.mask_paper(g, percentile).sum()) for g in grads)
    assert z_count == rule  # no ties in these gradients: the rule's k exactly
    assert round(measured["kept_fraction"].item() * n) == z_count
    inner = sum(
        float(np.sum(g * ref.mask_paper(g, percentile).reshape(g.shape) * g)) for g in grads
    )
    filtered_norm = np.sqrt(inner)
    cosine = inner / (filtered_norm * np.sqrt(sum(float(np.sum(g * g)) for g in grads)))
    np.testing.assert_allclose(measured["cosine"].item(), cosine, rtol=1e-5)
    assert 0.0 < measured["cosine"].item() <= 1.0
    if percentile == 0.0:
        assert measured["kept_fraction"].item() == 1.0


@pytest.mark.parametrize(("name", "variant"), [("asam", None), ("zsharp-asam", "paper"),
                                               ("zsharp-asam", "official")])  # fmt: skip
def test_param_groups_asam_weights_scope(name: str, variant: str | None) -> None:
    """ASAM's ``adaptive_scope: weights``: tensors named *weight* scaled by T, the rest not,
    under one global norm; here the second group also has its own ρ."""
    model = small_model(3)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for k, p in named if "weight" in k]},
        {"params": [p for k, p in named if "weight" not in k], "adaptive": False, "rho": 0.2},
    ]
    opt = zo.create(name, groups, lr=0.1, diagnostics=True, **kwargs_for(name, variant))
    backward(model, 30)
    grads = as_numpy([p.grad for p in params_of(opt)])
    want = expected(opt, model, grads, grads)
    opt.first_step()
    assert_matches(opt.diagnostics, want, sum(g.size for g in grads))


@pytest.mark.parametrize(("name", "variant"), [("sam", None), ("zsharp", "paper"),
                                               ("zsharp", "official")])  # fmt: skip
def test_bf16_parameters(name: str, variant: str | None) -> None:
    """bf16 gradients: norms accumulated in float32, ε built in float32 (‖ε‖ = ρ still)."""
    model = small_model(4, torch.bfloat16)
    opt = zo.create(
        name, zo.params_for(name, model), lr=0.1, diagnostics=True, **kwargs_for(name, variant)
    )
    backward(model, 40)
    grads = as_numpy([p.grad for p in model.parameters()])
    want = expected(opt, model, grads, grads)
    opt.first_step()
    measured = opt.diagnostics
    assert_matches(measured, want, sum(g.size for g in grads))
    assert all(v.dtype == torch.float32 for v in measured.values())
    if variant != "official":
        np.testing.assert_allclose(measured["epsilon_norm"].item(), 0.05, rtol=1e-6)


def test_float64_parameters_give_float64_diagnostics() -> None:
    model = small_model(5, torch.float64)
    opt = zo.create("zsharp", model.parameters(), lr=0.1, diagnostics=True)
    backward(model, 50)
    grads = as_numpy([p.grad for p in model.parameters()])
    want = expected(opt, model, grads, grads)
    opt.first_step()
    measured = opt.diagnostics
    assert all(v.dtype == torch.float64 for v in measured.values())
    assert_matches(measured, want, sum(g.size for g in grads), rtol=1e-12)


# --- GradScaler -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "variant"), [("sam", None), ("zsharp", "paper"),
                                               ("zsharp-fsam", "official")])  # fmt: skip
def test_grad_scaler_reports_the_unscaled_gradient(name: str, variant: str | None) -> None:
    """Scale 2^10 (exact): the diagnostics equal those of the unscaled twin, bit for bit."""
    model = small_model(6)
    twin = copy.deepcopy(model)
    kwargs = kwargs_for(name, variant)
    opt = zo.create(name, zo.params_for(name, model), lr=0.1, diagnostics=True, **kwargs)
    plain = zo.create(name, zo.params_for(name, twin), lr=0.1, diagnostics=True, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for step in range(2):
        backward(model, 60 + step, scaler)
        backward(twin, 60 + step)
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        plain.first_step(zero_grad=True)
        for key in KEYS:
            assert torch.equal(opt.diagnostics[key], plain.diagnostics[key]), key
        backward(model, 60 + step, scaler)
        backward(twin, 60 + step)
        opt.second_step(zero_grad=True, grad_scaler=scaler)
        scaler.update()
        plain.second_step(zero_grad=True)


def test_an_overflowing_pass_reports_no_perturbation() -> None:
    model = small_model(7)
    opt = zo.create("zsharp", model.parameters(), lr=0.1, diagnostics=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    backward(model, 70, scaler)
    next(model.parameters()).grad[0].fill_(float("inf"))
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    measured = opt.diagnostics
    assert measured["epsilon_norm"].item() == 0.0
    assert not torch.isfinite(measured["grad_norm"])


# --- off: nothing stored, nothing computed; on: the step is unchanged ------------------------


class RecordOps(TorchDispatchMode):
    """Counts every ATen operation dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_off_stores_and_computes_nothing_and_on_changes_no_weight(
    name: str, variant: str | None
) -> None:
    """Two steps each: off and on step bit for bit alike; the ops run with diagnostics off
    are a sub-multiset of those run with them on (the extra work exists only when on)."""
    model = small_model(8)
    twin = copy.deepcopy(model)
    kwargs = kwargs_for(name, variant)
    off = zo.create(name, zo.params_for(name, model), lr=0.1, momentum=0.9, **kwargs)
    on = zo.create(
        name, zo.params_for(name, twin), lr=0.1, momentum=0.9, diagnostics=True, **kwargs
    )
    assert off.record_diagnostics is False and on.record_diagnostics is True
    for step in range(2):
        counts = []
        for m, opt in ((model, off), (twin, on)):
            backward(m, 80 + step)
            with RecordOps() as recorder:
                opt.first_step(zero_grad=True)
            counts.append(recorder.ops)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)  # w + ε alike
        assert not counts[0] - counts[1]  # off ⊆ on
        assert counts[1] - counts[0]  # and on does more
        for m, opt in ((model, off), (twin, on)):
            backward(m, 80 + step)
            opt.second_step(zero_grad=True)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)
    assert off.diagnostics == {} and off._diagnostics == {}
    assert not any(isinstance(v, torch.Tensor) for v in vars(off).values())
    assert "diagnostics" not in str(off.state_dict()["param_groups"])
    assert set(on.diagnostics) == set(KEYS)


def test_record_diagnostics_can_be_switched() -> None:
    model = small_model(9)
    opt = zo.create("zsharp", model.parameters(), lr=0.1)
    backward(model, 90)
    opt.first_step(zero_grad=True)
    backward(model, 90)
    opt.second_step(zero_grad=True)
    assert opt.diagnostics == {}
    opt.record_diagnostics = True
    backward(model, 91)
    opt.first_step(zero_grad=True)
    first = opt.diagnostics
    assert set(first) == set(KEYS)
    backward(model, 91)
    opt.second_step(zero_grad=True)
    backward(model, 92)
    opt.first_step(zero_grad=True)
    # each step's values are new tensors: ones held from an earlier step stay as they were
    assert all(opt.diagnostics[k] is not first[k] for k in KEYS)
    opt.record_diagnostics = False
    assert opt.diagnostics == {}


def test_step_with_closure_records() -> None:
    model = small_model(10)
    opt = zo.ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, diagnostics=True)
    g = torch.Generator().manual_seed(100)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert np.isclose(opt.diagnostics["epsilon_norm"].item(), 0.05, rtol=1e-6)


# --- no host synchronisation ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_device_tensors(name: str, variant: str | None) -> None:
    """The values are 0-d float32 tensors on the parameters' device, detached (no host sync
    either: tests/test_step.py inspects every optimizer's step with diagnostics on)."""
    model = small_model(11)
    opt = zo.create(
        name, zo.params_for(name, model), lr=0.1, diagnostics=True, **kwargs_for(name, variant)
    )
    for step in range(2):  # the second F-SAM step takes the moving-average path
        backward(model, 110 + step)
        opt.first_step(zero_grad=True)
        measured = opt.diagnostics
        backward(model, 110 + step)
        opt.second_step(zero_grad=True)
    device = next(model.parameters()).device
    assert set(measured) == {"grad_norm", "epsilon_norm", "kept_fraction", "cosine"}
    for value in measured.values():
        assert isinstance(value, torch.Tensor) and value.shape == ()
        assert value.dtype == torch.float32 and value.device == device
        assert not value.requires_grad
