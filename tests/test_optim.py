"""zsharp.optim against the float64 references of tests/reference.py, and in real loops."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import zsharp.optim as zo
from tests import reference as ref
from zsharp.optim.registry import sharpness_aware_names

SAM_FAMILY = tuple(sharpness_aware_names())


def conv_model(seed: int = 0, bn: bool = True) -> nn.Module:
    """Conv (with and without bias), BatchNorm, Linear with bias: every tensor kind."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 6, 3, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
        nn.ReLU(),
        nn.Linear(10, 5),
    ]
    return nn.Sequential(*layers)


def batch(seed: int = 1, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def clone_with_grads(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def set_special_gradients(model: nn.Module) -> None:
    """Ties in one conv weight and a constant gradient in the first BN's bias."""
    params = list(model.parameters())
    with torch.no_grad():
        tied = params[0].grad
        tied.copy_(torch.round(tied / tied.abs().max() * 3) / 4)  # values in {-0.75..0.75}
        constant = next(p for p in params if p.ndim == 1)
        constant.grad.fill_(0.5)


def measured_epsilon(optimizer: zo.SAM, model: nn.Module) -> list[torch.Tensor]:
    """ε as the weights after first_step minus before."""
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.first_step()
    return [p.detach() - w for p, w in zip(model.parameters(), before, strict=True)]


def numpy_grads(model: nn.Module) -> tuple[list[np.ndarray], list[np.ndarray]]:
    params = list(model.parameters())
    return (
        [p.grad.detach().double().numpy() for p in params],
        [p.detach().double().numpy() for p in params],
    )


def assert_close(
    actual: list[torch.Tensor], expected: list[np.ndarray], atol=2e-7, rtol=1e-5
) -> None:
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a.double().numpy(), e, rtol=rtol, atol=atol)


# --- 1. ε equals the float64 reference --------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zsharp_epsilon_matches_reference(variant: str, adaptive: bool, seed: int) -> None:
    model = conv_model(seed)
    backward(model, *batch(seed))
    set_special_gradients(model)
    grads, weights = numpy_grads(model)
    eta = 0.01 if adaptive else 0.0
    opt = zo.ZSharp(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        rho=0.05,
        variant=variant,
        adaptive=adaptive,
        eta=eta,
    )
    expected = ref.epsilon(
        grads, weights, [0.05] * len(grads), variant=variant, adaptive=adaptive, eta=eta
    )
    assert_close(measured_epsilon(opt, model), expected)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_epsilon_match_reference(adaptive: bool) -> None:
    model = conv_model(3)
    backward(model, *batch(3))
    grads, weights = numpy_grads(model)
    opt = zo.SAM(model.parameters(), torch.optim.SGD, rho=0.3, adaptive=adaptive, eta=0.01, lr=1)
    expected = ref.epsilon(grads, weights, [0.3] * len(grads), adaptive=adaptive, eta=0.01)
    assert_close(measured_epsilon(opt, model), expected)


@pytest.mark.parametrize("zfilter", [None, zo.ZScoreFilter(90.0, "paper")])
def test_friendly_sam_epsilon_follows_its_moving_average(zfilter) -> None:
    """Three steps of F-SAM: ε_t from d_t = g_t − σ m_{t−1}, against the reference."""
    model = conv_model(4, bn=False)
    opt = zo.FriendlySAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.05,
        sigma=0.7,
        lmbda=0.8,
        lr=0.05,
        zfilter=zfilter,
    )
    seen_grads, measured = [], []
    for step in range(3):
        backward(model, *batch(10 + step))
        grads, weights = numpy_grads(model)
        seen_grads.append(grads)
        eps = measured_epsilon(opt, model)
        directions = ref.friendly_directions(seen_grads, sigma=0.7, lmbda=0.8)[-1]
        variant = None if zfilter is None else "paper"
        expected = ref.epsilon(
            directions, weights, [0.05] * len(grads), variant=variant, percentile=90.0
        )
        assert_close(eps, expected)
        measured.append(eps)
        opt.zero_grad()
        backward(model, *batch(10 + step))
        opt.second_step(zero_grad=True)
    assert "momentum" in opt.state[next(iter(model.parameters()))]


# --- 2. the kept set, percentile 0, ‖ε‖ = ρ, fallback, ρ = 0 ------------------------------


def kept_set_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        ("random", torch.randn(40, 9, generator=g)),
        ("ties", torch.tensor([[-3.0, -3.0, 3.0, 3.0, 1.0, -1.0, 0.0, 0.0]] * 5)),
        ("quantized", torch.round(torch.randn(64, 3, 3, generator=g) * 2) / 2),
        ("constant", torch.full((6, 5), 0.5)),
        ("one entry", torch.tensor([[2.5]])),
        ("one outlier", torch.tensor([[1.0, 1.0, 1.0, 0.0]])),
        ("bias", torch.randn(17, generator=g)),
        ("large", torch.randn(300, 301, generator=g)),
    ]


@pytest.mark.parametrize("percentile", [0.0, 50.0, 80.0, 95.0, 99.0])
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_kept_set_is_exactly_the_rule(variant: str, percentile: float) -> None:
    rule = ref.mask_paper if variant == "paper" else ref.mask_official
    for name, g in kept_set_cases():
        mask = zo.zscore_mask(g, percentile, variant)
        if variant == "official" and g.ndim == 1:
            expected = np.ones(g.numel(), dtype=bool)  # not filtered
        else:
            expected = rule(g.numpy(), percentile)
        np.testing.assert_array_equal(mask.numpy().ravel(), expected, err_msg=name)


def test_tie_rules_documented_examples() -> None:
    """|g − mean| = (3,3,3,3,1,1,0,0): keeping 1 entry (p=95) keeps all four tied 3s."""
    g = torch.tensor([-3.0, -3.0, 3.0, 3.0, 1.0, -1.0, 0.0, 0.0]).reshape(2, 4)
    assert zo.zscore_mask(g, 95.0, "paper").sum() == 4
    # official: threshold interpolates between the two top order statistics (both |z| of
    # the 3s), nothing is strictly above it
    assert zo.zscore_mask(g, 95.0, "official").sum() == 0
    assert zo.zscore_mask(torch.full((3, 3), 0.5), 95.0, "paper").all()
    assert not zo.zscore_mask(torch.full((3, 3), 0.5), 95.0, "official").any()


def released_threshold_mask(grad: torch.Tensor, percentile: float) -> torch.Tensor:
    """main.py's own expression: unbiased std + 1e-12, torch.quantile(|z|, p/100), strict >."""
    z = (grad - grad.mean()) / (grad.std() + 1e-12)
    return z.abs() > torch.quantile(z.abs(), percentile / 100)


def test_official_threshold_is_torch_quantile_bit_for_bit() -> None:
    """The released code's own expression (torch.quantile, strict >) gives the same mask."""
    gen = torch.Generator().manual_seed(3)
    for n in [2, 3, 20, 21, 100, 1000, 4097]:
        for _ in range(5):
            grad = torch.randn(n, 2, generator=gen)
            released = released_threshold_mask(grad, 95.0)
            assert torch.equal(zo.zscore_mask(grad, 95.0, "official"), released), n


CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_official_kept_set_is_the_released_code_for_every_size(device: str) -> None:
    """Every n in 2..2000 and p in {50, 90, 95, 99, 99.9}: the filter keeps exactly what
    ``|z| > torch.quantile(|z|, p/100)`` keeps, including where q·(n−1) is a whole number
    (torch's float64 rank then falls just below that order statistic).

    A continuous random tensor of every size, and for n ≡ 0, 1 (mod 10) one of deliberate
    ties too (values in ±{0.5, 1, 1.5}, never 0, so the filtered copy shows the mask). The
    filter runs once per p on all of them, batched by size as in a step.
    """
    gen = torch.Generator().manual_seed(11)
    tensors = []
    for n in range(2, 2001):
        tensors.append(torch.randn(n, generator=gen))
        if n % 10 in (0, 1):
            sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
            tensors.append(torch.randint(1, 4, (n,), generator=gen) * sign / 2.0)
    tensors = [t.to(device) for t in tensors]
    # main.py's z, once per tensor (it does not depend on p)
    z = [((t - t.mean()) / (t.std() + 1e-12)).abs() for t in tensors]
    mismatched = []
    for p in (50.0, 90.0, 95.0, 99.0, 99.9):
        filtered = zo.ZScoreFilter(p, "official").apply(tensors, [p] * len(tensors))
        for t, zt, f in zip(tensors, z, filtered, strict=True):
            released = zt > torch.quantile(zt, p / 100)
            if not torch.equal(f, torch.where(released, t, 0.0)):
                mismatched.append((t.numel(), p))
    assert not mismatched, mismatched[:10]


@pytest.mark.parametrize("per_tensor", [False, True])
def test_official_z_rounds_as_the_released_code(per_tensor: bool) -> None:
    """|z| bit for bit as main.py computes it, batched (the CPU path) or tensor by tensor
    (the path off the CPU, run here on the CPU)."""
    from zsharp.optim.zscore import _official_z

    gen = torch.Generator().manual_seed(5)
    for n in [2, 3, 20, 21, 257, 4097, 70_001]:
        tensors = [torch.randn(n, generator=gen) * 10.0**k + k for k in range(-2, 3)]
        z = _official_z(torch.stack(tensors), tensors, per_tensor=per_tensor)
        for row, t in zip(z, tensors, strict=True):
            assert torch.equal(row, ((t - t.mean()) / (t.std() + 1e-12)).abs()), n


def test_percentile_zero_is_sam() -> None:
    model = conv_model(5)
    backward(model, *batch(5))
    sam_model = clone_with_grads(model)
    eps_z = measured_epsilon(
        zo.ZSharp(model.parameters(), torch.optim.SGD, percentile=0.0, lr=1), model
    )
    eps_s = measured_epsilon(zo.SAM(sam_model.parameters(), torch.optim.SGD, lr=1), sam_model)
    for a, b in zip(eps_z, eps_s, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("percentile", [50.0, 95.0, 99.9])
def test_paper_epsilon_norm_is_rho(percentile: float) -> None:
    model = conv_model(6)
    backward(model, *batch(6))
    eps = measured_epsilon(
        zo.ZSharp(model.parameters(), torch.optim.SGD, rho=0.07, percentile=percentile, lr=1),
        model,
    )
    norm = torch.linalg.vector_norm(torch.cat([e.flatten() for e in eps]).double())
    assert norm.item() == pytest.approx(0.07, rel=1e-5)


def test_official_epsilon_norm_is_rho_per_filtered_tensor() -> None:
    model = conv_model(6)
    backward(model, *batch(6))
    eps = measured_epsilon(
        zo.ZSharp(model.parameters(), torch.optim.SGD, rho=0.05, variant="official", lr=1),
        model,
    )
    for p, e in zip(model.parameters(), eps, strict=True):
        if p.ndim > 1:
            assert torch.linalg.vector_norm(e.double()).item() == pytest.approx(0.05, rel=1e-5)


def test_all_zero_filtered_gradient_falls_back_to_gradient() -> None:
    """Each tensor: ones with exactly k zeros. The zeros have the largest |z|, so the
    filtered gradient is zero everywhere and ε must be SAM's ε = ρ g / ‖g‖."""
    model = conv_model(7, bn=False)
    backward(model, *batch(7))
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            k = ref.math.ceil(n * 5 / 100)
            flat = torch.ones(n)
            flat[torch.randperm(n, generator=torch.Generator().manual_seed(n))[:k]] = 0.0
            if n < 4:  # too small for the zeros to be a minority: give it a plain gradient
                flat = torch.arange(1.0, n + 1.0)
            p.grad.copy_(flat.view_as(p))
    sam_model = clone_with_grads(model)
    assert all(
        not (zo.zscore_mask(p.grad, 95.0) & (p.grad != 0)).any()
        for p in model.parameters()
        if p.numel() >= 4
    )
    eps_z = measured_epsilon(zo.ZSharp(model.parameters(), torch.optim.SGD, lr=1), model)
    eps_s = measured_epsilon(zo.SAM(sam_model.parameters(), torch.optim.SGD, lr=1), sam_model)
    for a, b in zip(eps_z, eps_s, strict=True):
        torch.testing.assert_close(a, b)
    assert sum(e.abs().sum() for e in eps_z) > 0


@pytest.mark.parametrize("name", SAM_FAMILY)
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_rho_zero_is_exactly_the_base_optimizer(name: str, base: str) -> None:
    kwargs = {"lr": 0.05, **({"momentum": 0.9} if base == "sgd" else {})}
    model = conv_model(8, bn=False)
    twin = copy.deepcopy(model)
    opt = zo.create(name, zo.params_for(name, model), base=base, rho=0.0, **kwargs)
    plain = zo.create(base, twin.parameters(), **kwargs)
    for step in range(4):
        x, y = batch(20 + step)
        backward(model, x, y)
        opt.first_step(zero_grad=True)
        backward(model, x, y)
        opt.second_step(zero_grad=True)
        backward(twin, x, y)
        plain.step()
        plain.zero_grad()
    # GSAM's decomposition g − cos θ‖g‖g'/(‖g'‖ + 1e-12) leaves float32 rounding where
    # g' = g, which Adam's first steps scale up to ~1e-5 on entries of near-zero gradient
    exact = not getattr(opt, "keeps_ascent_gradient", False) or name.endswith("looksam")
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-4, atol=5e-5)


def test_large_tensor_beyond_quantile_limit() -> None:
    """2^24 + 3 entries in one tensor (torch.quantile's old limit): the exact count is kept."""
    n = (1 << 24) + 3
    p = nn.Parameter(torch.zeros(n))
    p.grad = torch.randn(n, generator=torch.Generator().manual_seed(0))
    for variant in ["paper", "official"]:
        mask = zo.zscore_mask(p.grad.view(1, -1), 95.0, variant)
        k = ref.math.ceil(n * 5 / 100)
        if variant == "paper":
            assert mask.sum().item() == k
        else:  # strictly above the interpolated order statistic: k − 1 or k entries
            assert k - 1 <= mask.sum().item() <= k
    opt = zo.ZSharp([p], torch.optim.SGD, lr=0.1)
    opt.first_step()
    assert (p.detach() != 0).sum().item() == ref.math.ceil(n * 5 / 100)


# --- 3. state_dict, schedulers, per-group ρ -------------------------------------------------


def train_steps(model, opt, steps, seed0, scheduler=None) -> None:
    for step in range(steps):
        x, y = batch(seed0 + step)
        backward(model, x, y)
        opt.first_step(zero_grad=True)
        with zo.disable_running_stats(model):
            backward(model, x, y)
        opt.second_step(zero_grad=True)
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("name", SAM_FAMILY)
def test_state_dict_round_trip_continues_in_lockstep(name: str) -> None:
    model = conv_model(9)
    opt = zo.create(name, zo.params_for(name, model), base="adam", lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_steps(model, opt, 3, 100, sched)

    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clone = conv_model(99)  # different init: everything must come from the checkpoint
    clone.load_state_dict(saved["model"])
    clone_opt = zo.create(name, zo.params_for(name, clone), base="adam", lr=1e-3, weight_decay=1e-4)
    clone_sched = torch.optim.lr_scheduler.StepLR(clone_opt, step_size=2, gamma=0.5)
    clone_opt.load_state_dict(saved["opt"])
    clone_sched.load_state_dict(saved["sched"])

    train_steps(model, opt, 3, 200, sched)
    train_steps(clone, clone_opt, 3, 200, clone_sched)
    for a, b in zip(model.state_dict().values(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert clone_opt.base_optimizer.param_groups is clone_opt.param_groups
    assert clone_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_state_dict_holds_no_copy_of_the_weights() -> None:
    model = conv_model(10)
    opt = zo.create("zsharp-fsam", model.parameters(), base="sgd", lr=0.1)
    backward(model, *batch())
    weights = [p.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)  # mid-step: w is held by the optimizer now
    saved = opt.state_dict()
    tensors = [
        v
        for section in (saved["state"], saved["base_state"])
        for s in section.values()
        for v in s.values()
        if torch.is_tensor(v)
    ]
    assert tensors  # F-SAM's moving average is there
    assert not any(t.shape == w.shape and torch.equal(t, w) for t in tensors for w in weights)
    assert {k for s in saved["state"].values() for k in s} == {"momentum"}


def test_scheduler_on_the_wrapper_drives_the_base_lr() -> None:
    model = conv_model(11)
    opt = zo.create("zsharp", model.parameters(), base="sgd", lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        train_steps(model, opt, 3, 300, sched)
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    # the update really used that lr: one more step with SGD (no momentum) moves w by lr·g'
    x, y = batch(400)
    backward(model, x, y)
    opt.first_step(zero_grad=True)
    backward(model, x, y)
    g = [p.grad.clone() for p in model.parameters()]
    w = [p.detach().clone() for p in opt._saved_weights]
    opt.second_step(zero_grad=True)
    for p, w0, g0 in zip(model.parameters(), w, g, strict=True):
        torch.testing.assert_close(p.detach(), w0 - 0.01 * g0)


def test_per_group_rho() -> None:
    model = conv_model(12)
    params = list(model.parameters())
    first, rest = params[:2], params[2:]
    opt = zo.SAM(
        [{"params": first, "rho": 0.2}, {"params": rest, "rho": 0.0}], torch.optim.SGD, lr=1
    )
    backward(model, *batch())
    grads, weights = numpy_grads(model)
    eps = measured_epsilon(opt, model)
    assert all(torch.count_nonzero(e) == 0 for e in eps[2:])
    expected = ref.epsilon(grads, weights, [0.2, 0.2] + [0.0] * len(rest))
    assert_close(eps, expected)


# --- 4. BatchNorm ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sam", "zsharp", "zsharp-fsam"])
def test_batchnorm_running_stats_count_the_batch_once(name: str) -> None:
    model = conv_model(13)
    reference = copy.deepcopy(model)
    x, y = batch(13)
    opt = zo.create(name, zo.params_for(name, model), lr=0.1)
    backward(model, x, y)
    opt.first_step(zero_grad=True)
    with zo.disable_running_stats(model):
        backward(model, x, y)
    opt.second_step(zero_grad=True)
    reference(x)  # one forward pass of the first batch, in training mode
    for (name_a, a), (_, b) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(a, b), name_a
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_disable_running_stats_keeps_the_batch_statistics_gradient() -> None:
    model = conv_model(14)
    x, y = batch(14)
    backward(model, x, y)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with zo.disable_running_stats(model):
        backward(model, x, y)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g)


# --- 5. every optimizer learns digits ------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)
    return x, torch.tensor(data.target)


@pytest.mark.parametrize("name", zo.OPTIMIZERS)
def test_every_optimizer_lowers_the_digits_loss(name: str, digits) -> None:
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    kwargs = {"lr": 3e-3} if name in ("adam", "adamw") else {"lr": 0.05, "momentum": 0.9}
    opt = zo.create(name, zo.params_for(name, model), **kwargs)
    initial = F.cross_entropy(model(x), y).item()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    for step in range(60):
        idx = order[(step * 64) % 1728 :][:64]
        if isinstance(opt, zo.SAM):
            opt.step(lambda idx=idx: F.cross_entropy(model(x[idx]), y[idx]).backward())
        else:
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    final = F.cross_entropy(model(x), y).item()
    assert final < 0.5 * initial, (initial, final)


def test_step_with_closure_equals_explicit_steps() -> None:
    model = conv_model(15)
    twin = copy.deepcopy(model)
    x, y = batch(15)
    a = zo.create("zsharp", model.parameters(), lr=0.1)
    b = zo.create("zsharp", twin.parameters(), lr=0.1)

    def closure():
        with zo.disable_running_stats(model, enabled=a.perturbed):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        return loss

    loss = a.step(closure)
    backward(twin, x, y)
    b.first_step(zero_grad=True)
    with zo.disable_running_stats(twin):
        backward(twin, x, y)
    b.second_step(zero_grad=True)
    assert loss is not None
    for p, q in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(p, q)


# --- 6. bad arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "word"),
    [
        (lambda p: zo.SAM(p, torch.optim.SGD, rho=-0.1), "rho"),
        (lambda p: zo.ZSharp(p, torch.optim.SGD, percentile=100.0), "percentile"),
        (lambda p: zo.ZSharp(p, torch.optim.SGD, percentile=-1.0), "percentile"),
        (lambda p: zo.ZSharp(p, torch.optim.SGD, percentile="95"), "percentile"),
        (lambda p: zo.ZSharp(p, torch.optim.SGD, variant="released"), "variant"),
        (lambda p: zo.SAM(p, torch.optim.SGD(p, lr=0.1)), "base_optimizer"),
        (lambda p: zo.SAM(p, "sgd"), "base_optimizer"),
        (lambda p: zo.SAM(p, nn.Linear), "base_optimizer"),
        (lambda p: zo.SAM(p, torch.optim.SGD, eta=-1.0, adaptive=True), "eta"),
        (lambda p: zo.FriendlySAM(p, torch.optim.SGD, lmbda=1.0), "lmbda"),
        (lambda p: zo.FriendlySAM(p, torch.optim.SGD, sigma=-1.0), "sigma"),
        (lambda p: zo.SAM([{"params": p, "rho": -1.0}], torch.optim.SGD), "rho"),
        (lambda p: zo.SAM(p, torch.optim.SGD, lr=0.1, momentun=0.9), "momentun"),
        (lambda p: zo.create("zsharpp", p), "zsharpp"),
        (lambda p: zo.create("sam", p, base="rmsprop"), "base"),
        (lambda p: zo.create("zsharp", p, percentile=120), "percentile"),
        (lambda p: zo.create("zsharp", p, variant="x"), "variant"),
        (lambda p: zo.create("sam", p, percentile=90.0), "percentile.*sam"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(build, word: str) -> None:
    params = list(nn.Linear(3, 2).parameters())
    with pytest.raises(ValueError, match=word):
        build(params)


def test_misordered_steps_raise() -> None:
    model = conv_model(16)
    opt = zo.create("sam", model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="second_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="backward"):
        opt.first_step()


# --- mixed precision ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_bf16_autocast_epsilon_matches_reference(variant: str) -> None:
    model = conv_model(18)
    x, y = batch(18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    grads, weights = numpy_grads(model)
    opt = zo.ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, variant=variant)
    expected = ref.epsilon(grads, weights, [0.05] * len(grads), variant=variant)
    assert_close(measured_epsilon(opt, model), expected)


def test_bf16_parameters_epsilon_matches_reference_after_rounding() -> None:
    """bf16 weights: w + ε is the reference's w + ε rounded to bf16 (1 ulp at most)."""
    model = conv_model(19).to(torch.bfloat16)
    x, y = batch(19)
    F.cross_entropy(model(x.bfloat16()), y).backward()
    grads, weights = numpy_grads(model)
    opt = zo.ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.first_step()
    expected = ref.epsilon(grads, weights, [0.05] * len(grads), variant="paper")
    mismatched = total = 0
    for p, w, e in zip(model.parameters(), weights, expected, strict=True):
        target = torch.from_numpy(w + e).to(torch.bfloat16).double()
        actual = p.detach().double()
        # one bf16 rounding of ε (computed in the weights' dtype) and one of w + ε
        bound = (target.abs() + torch.from_numpy(np.abs(e))) * 2.0**-7
        assert torch.all((actual - target).abs() <= bound)
        mismatched += int((actual != target).sum())
        total += actual.numel()
    assert mismatched <= 0.02 * total, mismatched / total  # measured: 0.7 %


def scaler_step(
    model, opt, scaler, x, y, poison: str | None = None, max_grad_norm: float | None = None
) -> None:
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if poison == "first":
        next(iter(model.parameters())).grad.view(-1)[0] = float("inf")
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    with zo.disable_running_stats(model):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    if poison == "second":
        next(iter(model.parameters())).grad.view(-1)[0] = float("nan")
    opt.second_step(zero_grad=True, grad_scaler=scaler, max_grad_norm=max_grad_norm)
    scaler.update()


@pytest.mark.parametrize("name", ["sam", "fsam", "zsharp"])
def test_grad_scaler_unscales_each_pass_once(name: str) -> None:
    """fp32 model, loss scale 2^10 (exact): the scaled step equals the unscaled one."""
    model = conv_model(20)
    twin = copy.deepcopy(model)
    opt = zo.create(name, zo.params_for(name, model), base="sgd", lr=0.1, momentum=0.9)
    plain = zo.create(name, zo.params_for(name, twin), base="sgd", lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for step in range(3):
        x, y = batch(30 + step)
        scaler_step(model, opt, scaler, x, y)
        train_steps(twin, plain, 1, 30 + step)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert scaler.get_scale() == 2.0**10


@pytest.mark.parametrize("poison", ["first", "second"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.1])
def test_grad_scaler_skips_the_update_when_either_pass_overflows(
    poison: str, max_grad_norm: float | None
) -> None:
    """Also with clipping, which unscales the second pass before the scaler's step."""
    model = conv_model(21)
    opt = zo.create("zsharp", model.parameters(), base="sgd", lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = copy.deepcopy(model.state_dict())
    scaler_step(model, opt, scaler, *batch(21), poison=poison, max_grad_norm=max_grad_norm)
    for key, value in model.state_dict().items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, before[key]), key
    assert scaler.get_scale() == 2.0**9
    assert not opt.perturbed


def test_fp16_autocast_with_grad_scaler_trains() -> None:
    model = conv_model(22)
    opt = zo.create("zsharp", model.parameters(), base="sgd", lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(22, n=64)
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.float16):
            scaler_step(model, opt, scaler, x, y)
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < initial


def test_friendly_sam_moving_average_survives_an_overflowing_pass() -> None:
    """fp16-style overflow in one first pass must not poison F-SAM's moving average."""
    model = conv_model(23)
    opt = zo.create("fsam", model.parameters(), base="sgd", lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x, y = batch(23)
    scaler_step(model, opt, scaler, x, y)
    momentum = [opt.state[p]["momentum"].clone() for p in model.parameters()]
    scaler_step(model, opt, scaler, x, y, poison="first")  # skipped, scale halves
    assert all(
        torch.equal(opt.state[p]["momentum"], m)
        for p, m in zip(model.parameters(), momentum, strict=True)
    )
    before = [p.detach().clone() for p in model.parameters()]
    scaler_step(model, opt, scaler, x, y)  # learns again
    assert all(torch.isfinite(opt.state[p]["momentum"]).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert scaler.get_scale() == 2.0**9


def test_step_with_a_closure_that_zeroes_gradients_itself() -> None:
    """torch.optim-style closures (zero_grad inside) give the explicit two-step result."""
    model = conv_model(24, bn=False)
    twin = copy.deepcopy(model)
    a = zo.create("zsharp", model.parameters(), lr=0.1)
    b = zo.create("zsharp", twin.parameters(), lr=0.1)
    for step in range(3):
        x, y = batch(40 + step)

        def closure(x=x, y=y):
            a.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        a.step(closure)
        backward(twin, x, y)
        b.first_step(zero_grad=True)
        backward(twin, x, y)
        b.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fp16_parameters_with_a_gradient_norm_beyond_fp16_range() -> None:
    """‖g‖ > 65504 (fp16's largest value): the norm is taken in float32, ε stays finite."""
    p = nn.Parameter(torch.zeros(64, 64, dtype=torch.float16))
    p.grad = torch.full((64, 64), 2000.0, dtype=torch.float16)  # ‖g‖ = 128 000
    opt = zo.SAM([p], torch.optim.SGD, rho=0.05, lr=0.1)
    opt.first_step()
    assert torch.isfinite(p).all()
    assert torch.linalg.vector_norm(p.float()).item() == pytest.approx(0.05, rel=1e-2)


# --- clipping the descent gradient -----------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clips, does not clip
@pytest.mark.parametrize("scaled", [False, True])
def test_second_step_clips_the_descent_gradient(max_norm: float, scaled: bool) -> None:
    """SAM + SGD on a linear MSE model against the float64 reference of reference.py:
    g' = ∇L(w + ε) clipped to max_norm, then w − lr·g'. With a GradScaler (scale 2^10,
    exact) each pass is unscaled exactly once, so the step is the same."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=gen), 3 * torch.randn(32, 3, generator=gen)
    w, b = (p.detach().double().numpy().copy() for p in model.parameters())
    opt = zo.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None

    def backward_pass() -> None:
        loss = F.mse_loss(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()

    backward_pass()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    backward_pass()
    opt.second_step(zero_grad=True, grad_scaler=scaler, max_grad_norm=max_norm)
    expected = ref.clipped_sam_sgd_step(
        w, b, x.numpy(), y.numpy(), rho=0.1, lr=0.5, max_norm=max_norm
    )
    assert_close([model.weight.detach(), model.bias.detach()], list(expected))
    unclipped = ref.clipped_sam_sgd_step(
        w, b, x.numpy(), y.numpy(), rho=0.1, lr=0.5, max_norm=float("inf")
    )
    assert np.allclose(expected[0], unclipped[0]) == (max_norm > 1)  # the case is what it says
    if scaler is not None:
        scaler.update()
        assert scaler.get_scale() == 2.0**10  # no overflow seen


def test_max_grad_norm_must_be_nonnegative() -> None:
    model = nn.Linear(3, 2)
    opt = zo.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    F.mse_loss(model(torch.ones(4, 3)), torch.zeros(4, 2)).backward()
    opt.first_step()
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.second_step(max_grad_norm=-1.0)


# --- float64 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [None, "paper", "official"])
def test_float64_parameters_epsilon_matches_reference(variant: str | None) -> None:
    """float64 weights: norms and ε stay in float64, so ε is the reference to ~1e-12."""
    model = conv_model(25).double()
    x, y = batch(25)
    F.cross_entropy(model(x.double()), y).backward()
    grads, weights = numpy_grads(model)
    if variant is None:
        opt = zo.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    else:
        opt = zo.ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, variant=variant)
    expected = ref.epsilon(grads, weights, [0.05] * len(grads), variant=variant)
    assert_close(measured_epsilon(opt, model), expected, atol=1e-15, rtol=1e-10)
