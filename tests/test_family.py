"""The SAM family: each variant against a float64 transcription of its reference code, and
with the Z-score filter on its ascent.

Each ``*_reference`` below is written from the released code of the variant's authors (the
module docstrings of ``zsharp.optim`` name the files), in float64, on a copy of the model,
with torch's SGD (momentum, weight decay) as the base optimizer: it shares no code with
``zsharp.optim``. Several steps run so that the state the variants keep (LookSAM's
direction, VaSSO's average, the base optimizer's momentum) is exercised; LookSAM's run
holds refresh and reuse steps; GSAM's learning rate changes every step, so its radius
does. The references restore w exactly (the released codes subtract ε: a difference of
rounding, none in these tests' float64). Where pytorch_optimizer implements the same
rule (GSAM; WSAM without clipping) it is run as is and compared too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import zsharp.optim as zo
from tests import reference as ref
from zsharp.optim.step import SharpnessAwareStep

LR, MOMENTUM, WD = 0.1, 0.9, 1e-3
Eps = Callable[[list[Tensor], list[Tensor]], list[Tensor]]  # (direction, w) → ε


def model(seed: int = 0) -> nn.Module:
    """No batch statistics (so every pass sees the same function); a LayerNorm for SAM-ON."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 5),
    ).double()  # fmt: skip


def batches(n: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(24, 12, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (24,), generator=g),
        )
        for _ in range(n)
    ]


class Reference:
    """A float64 copy of the model, its gradients and torch's SGD as the base."""

    def __init__(self, net: nn.Module, lr: float = LR) -> None:
        self.net = copy.deepcopy(net)
        self.params = list(self.net.parameters())
        self.sgd = torch.optim.SGD(self.params, lr=lr, momentum=MOMENTUM, weight_decay=WD)

    def grad(self, x: Tensor, y: Tensor, at: list[Tensor] | None = None) -> list[Tensor]:
        saved = [p.detach().clone() for p in self.params]
        if at is not None:
            with torch.no_grad():
                for p, a in zip(self.params, at, strict=True):
                    p.copy_(a)
        loss = F.cross_entropy(self.net(x), y)
        grads = [g.detach() for g in torch.autograd.grad(loss, self.params)]
        with torch.no_grad():
            for p, s in zip(self.params, saved, strict=True):
                p.copy_(s)
        return grads

    def w(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]

    def descend(self, d: list[Tensor]) -> None:
        for p, g in zip(self.params, d, strict=True):
            p.grad = g.clone()
        self.sgd.step()

    def perturbed(self, e: list[Tensor]) -> list[Tensor]:
        return [w + ei for w, ei in zip(self.w(), e, strict=True)]


def norm(tensors: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((t * t).sum() for t in tensors))


def inner(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def sam_eps(rho: float, eps: float = 1e-12) -> Eps:
    """ε = ρ·d/(‖d‖ + eps), the released codes' perturbation."""
    return lambda d, w: [rho * t / (norm(d) + eps) for t in d]


def zsharp_eps(rho: float, variant: str, percentile: float = 90.0, guard: float = 1e-12) -> Eps:
    """ZSharp's ε (tests/reference.py, written from the paper and the released main.py),
    normalised with the variant's own guard."""

    def eps(d: list[Tensor], w: list[Tensor]) -> list[Tensor]:
        out = ref.epsilon([t.numpy() for t in d], [t.numpy() for t in w], [rho] * len(d),
                          variant=variant, percentile=percentile, eps=guard)  # fmt: skip
        return [torch.from_numpy(e) for e in out]

    return eps


# --- transcriptions of the reference codes ---------------------------------------------------


def gsam_reference(net, data, lrs, rho_max, rho_min, alpha, eps_of: Callable[[float], Eps]):
    """juntang-zhuang/GSAM gsam.py: ρ_t from the lr (ProportionScheduler, unclamped);
    e = ρ_t g/(‖g‖+1e-12); cos = ⟨g,g'⟩/(‖g'‖‖g‖+1e-12); vertical = g − cos‖g‖g'/(‖g'‖+1e-12);
    grad = g' − α·vertical; base step."""
    r = Reference(net)
    lr_max, lr_min = LR, 0.0
    for (x, y), lr in zip(data, lrs, strict=True):
        for group in r.sgd.param_groups:
            group["lr"] = lr
        rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        g = r.grad(x, y)
        gp = r.grad(x, y, at=r.perturbed(eps_of(rho)(g, r.w())))
        cos = inner(g, gp) / (norm(gp) * norm(g) + 1e-12)
        vertical = [a - cos * norm(g) * b / (norm(gp) + 1e-12) for a, b in zip(g, gp, strict=True)]
        r.descend([b - alpha * v for b, v in zip(gp, vertical, strict=True)])
    return r.w()


def looksam_reference(net, data, rho, k, alpha, eps: Eps):
    """MarlonBecker/MSAM looksam.py (whole vectors): a refresh at the first step and every k
    after: e = ρg/(‖g‖+1e-12), g_s at w+e, u = g_s − ⟨g_s,g⟩/(‖g‖²+1e-12)·g, ĝ_v = u/‖u‖,
    descend with g_s; otherwise descend with g + α‖g‖ĝ_v."""
    r = Reference(net)
    unit = None
    for t, (x, y) in enumerate(data):
        g = r.grad(x, y)
        if t % k == 0:
            gs = r.grad(x, y, at=r.perturbed(eps(g, r.w())))
            along = inner(gs, g) / (norm(g) ** 2 + 1e-12)
            u = [a - along * b for a, b in zip(gs, g, strict=True)]
            unit = [t_ / norm(u) for t_ in u]
            r.descend(gs)
        else:
            r.descend([a + alpha * norm(g) * v for a, v in zip(g, unit, strict=True)])
    return r.w()


def wsam_reference(net, data, rho, gamma, decouple, max_norm, eps: Eps):
    """atorch optimizers/wsam.py (the latest): α = γ/(1−γ); e = ρg/(‖g‖+1e-12); g and g̃
    each clipped to max_norm (coef = max_norm/(‖·‖+1e-6), at most 1); decoupled: the base
    steps with g, then w −= lr·α·(g̃ − g); coupled: the base steps with αg̃ + (1−α)g."""
    r = Reference(net)
    alpha = gamma / (1 - gamma)

    def clip(v: list[Tensor]) -> list[Tensor]:
        if max_norm is None:
            return v
        coef = min(1.0, max_norm / (float(norm(v)) + 1e-6))
        return [t * coef for t in v]

    for x, y in data:
        g = r.grad(x, y)
        gt = r.grad(x, y, at=r.perturbed(eps(g, r.w())))
        g1, g2 = clip(g), clip(gt)
        if decouple:
            r.descend(g1)
            with torch.no_grad():
                for p, a, b in zip(r.params, g1, g2, strict=True):
                    p.sub_(LR * alpha * (b - a))
        else:
            r.descend([alpha * b + (1 - alpha) * a for a, b in zip(g1, g2, strict=True)])
    return r.w()


def vasso_reference(net, data, rho, theta, eps_of: Callable[[float], Eps] | None = None):
    """BingcongLi/VaSSO solver/vasso.py: d_1 = g_1, d = (1−θ)d + θg; e = ρd/(‖d‖+1e-7);
    descend with the gradient at w + e."""
    r = Reference(net)
    d = None
    for x, y in data:
        g = r.grad(x, y)
        if d is None:
            d = [t.clone() for t in g]
        else:
            d = [(1 - theta) * a + theta * b for a, b in zip(d, g, strict=True)]
        e = (eps_of or (lambda rho_: sam_eps(rho_, 1e-7)))(rho)(d, r.w())
        r.descend(r.grad(x, y, at=r.perturbed(e)))
    return r.w()


def samon_reference(net, data, rho, adaptive, eta):
    """mueller-mp/SAM-ON sam_on.py, only_norm: the parameters whose name contains 'norm' or
    'bn' (weight and bias; here the LayerNorm, module 2); ε = ρT²g/(‖Tg‖_ON + 1e-16) on
    them, T = |w| + η (ASAM_ON, elementwise, normalize_bias) or 1 (SAM_ON); 0 elsewhere."""
    r = Reference(net)
    names = [n for n, _ in r.net.named_parameters()]
    on = [n.startswith("2.") for n in names]  # nn.Sequential names it "2.weight", "2.bias"
    for x, y in data:
        g = r.grad(x, y)
        w = r.w()
        t = [(w_.abs() + eta) if adaptive else torch.ones_like(w_) for w_ in w]
        tg = [ti * gi for ti, gi, o in zip(t, g, on, strict=True) if o]
        n = norm(tg) + 1e-16
        e = [rho * ti * ti * gi / n if o else torch.zeros_like(gi)
             for ti, gi, o in zip(t, g, on, strict=True)]  # fmt: skip
        r.descend(r.grad(x, y, at=r.perturbed(e)))
    return r.w()


# --- ours ----------------------------------------------------------------------------------------


def ours(name: str, net: nn.Module, data, lrs=None, **kwargs) -> list[Tensor]:
    net = copy.deepcopy(net)
    params = zo.params_for(name, net)
    opt = zo.create(name, params, base="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WD, **kwargs)
    step = SharpnessAwareStep(net, opt, F.cross_entropy)
    for i, (x, y) in enumerate(data):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        step(x, y)
    return [p.detach() for p in net.parameters()]


def assert_close(a: list[Tensor], b: list[Tensor], tol: float = 1e-11) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def far(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


VARIANTS = [None, "paper", "official"]  # None: the variant itself; else ZSharp on it


def named(base: str, variant: str | None) -> tuple[str, dict]:
    return (
        (base, {})
        if variant is None
        else (f"zsharp-{base}", {"variant": variant, "percentile": 90.0})
    )


def eps_rule(variant: str | None, eps: float = 1e-12) -> Callable[[float], Eps]:
    """ε of the variant (``None``: SAM's rule) or of ZSharp on it, with the variant's guard."""
    if variant is None:
        return lambda rho: sam_eps(rho, eps)
    return lambda rho: zsharp_eps(rho, variant, guard=eps)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gsam_is_the_released_code(variant: str | None) -> None:
    net, data = model(1), batches(5)
    lrs = [LR * (1 - i / 5) for i in range(5)]  # a decaying rate: ρ_t changes every step
    name, extra = named("gsam", variant)
    got = ours(name, net, data, lrs, rho=0.1, rho_min=0.02, alpha=0.3, **extra)
    expected = gsam_reference(net, data, lrs, 0.1, 0.02, 0.3, eps_rule(variant))
    assert_close(got, expected)
    sam = ours("sam" if variant is None else "zsharp", net, data, lrs, rho=0.1, **extra)
    assert far(got, sam) > 1e-6  # the descent (and the radius) are GSAM's own


def test_gsam_alpha_zero_and_a_constant_radius_is_sam() -> None:
    net, data = model(2), batches(3)
    assert_close(ours("gsam", net, data, rho=0.07, alpha=0.0), ours("sam", net, data, rho=0.07))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", [1, 3])
def test_looksam_is_the_released_code(k: int, variant: str | None) -> None:
    net, data = model(3), batches(7)
    name, extra = named("looksam", variant)
    got = ours(name, net, data, rho=0.1, k=k, alpha=0.6, **extra)
    rho_eps = eps_rule(variant)(0.1)
    assert_close(got, looksam_reference(net, data, 0.1, k, 0.6, rho_eps))


def test_looksam_takes_one_pass_between_refreshes() -> None:
    net, (x, y) = model(4), batches(1)[0]
    forwards = []
    net.register_forward_pre_hook(lambda *_: forwards.append(1))
    opt = zo.create("looksam", net.parameters(), lr=LR, k=4)
    step = SharpnessAwareStep(net, opt, F.cross_entropy)
    per_step = []
    for _ in range(9):
        before = len(forwards)
        step(x, y)
        per_step.append(len(forwards) - before)
    assert per_step == [2, 1, 1, 1, 2, 1, 1, 1, 2]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("decouple", "max_norm"), [(True, None), (False, None), (True, 0.3), (False, 0.3)]
)
def test_wsam_is_the_released_code(
    decouple: bool, max_norm: float | None, variant: str | None
) -> None:
    net, data = model(5), batches(4)
    name, extra = named("wsam", variant)
    got = ours(name, net, data, rho=0.05, gamma=0.8, decouple=decouple, max_norm=max_norm, **extra)
    expected = wsam_reference(net, data, 0.05, 0.8, decouple, max_norm, eps_rule(variant)(0.05))
    assert_close(got, expected)


def test_wsam_gamma_one_half_is_sam() -> None:
    """α = γ/(1−γ) = 1: the coupled gradient is g̃, SAM's."""
    net, data = model(6), batches(3)
    assert_close(ours("wsam", net, data, gamma=0.5, decouple=False), ours("sam", net, data))


@pytest.mark.parametrize("variant", VARIANTS)
def test_vasso_is_the_released_code(variant: str | None) -> None:
    net, data = model(7), batches(5)
    name, extra = named("vasso", variant)
    got = ours(name, net, data, rho=0.08, theta=0.4, **extra)
    eps_of = None if variant is None else eps_rule(variant, 1e-7)  # VaSSO's guard
    assert_close(got, vasso_reference(net, data, 0.08, 0.4, eps_of))


@pytest.mark.parametrize(("adaptive", "eta"), [(False, 0.0), (True, 0.01)])
def test_sam_on_is_the_released_code(adaptive: bool, eta: float) -> None:
    net, data = model(8), batches(4)
    got = ours("sam-on", net, data, rho=0.5, adaptive=adaptive, eta=eta)
    assert_close(got, samon_reference(net, data, 0.5, adaptive, eta))


def test_sam_on_refuses_a_flat_parameter_list() -> None:
    with pytest.raises(ValueError, match="normalization_groups"):
        zo.create("sam-on", model().parameters(), lr=LR)


def test_zsharp_on_sam_on_filters_the_normalisation_layers_only() -> None:
    """The paper's filter on SAM-ON's 1-D norm tensors; the released one filters no 1-D
    tensor, so composed with SAM-ON it is SAM-ON."""
    net, data = model(9), batches(3)
    official = ours("zsharp-sam-on", net, data, rho=0.5, variant="official")
    assert_close(official, ours("sam-on", net, data, rho=0.5))
    paper = ours("zsharp-sam-on", net, data, rho=0.5, variant="paper", percentile=50.0)
    assert far(paper, official) > 1e-6


# --- pytorch_optimizer, run as is --------------------------------------------------------------


def test_gsam_equals_pytorch_optimizer() -> None:
    """pytorch_optimizer's GSAM (the same rule as the authors' port) with a constant radius,
    float32, to float32 rounding."""
    po = pytest.importorskip("pytorch_optimizer")
    net, data = model(10).float(), [(x.float(), y) for x, y in batches(4)]
    theirs = copy.deepcopy(net)
    base = torch.optim.SGD(theirs.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0)
    rho = po.ProportionScheduler(scheduler, max_lr=LR, min_lr=0.0, max_value=0.05, min_value=0.05)
    gsam = po.GSAM(theirs.parameters(), base, theirs, rho, alpha=0.3)
    for x, y in data:
        gsam.set_closure(F.cross_entropy, x, y)
        gsam.step()
        gsam.update_rho_t()
    got = ours("gsam", net, data, rho=0.05, alpha=0.3)
    for a, b in zip(got, theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_equals_pytorch_optimizer(decouple: bool) -> None:
    po = pytest.importorskip("pytorch_optimizer")
    net, data = model(11).float(), [(x.float(), y) for x, y in batches(4)]
    theirs = copy.deepcopy(net)
    wsam = po.WSAM(theirs, theirs.parameters(), torch.optim.SGD, rho=0.05, gamma=0.8,
                   decouple=decouple, lr=LR, momentum=MOMENTUM, weight_decay=WD)  # fmt: skip
    for x, y in data:

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            loss = F.cross_entropy(theirs(x), y)
            loss.backward()
            return loss

        wsam.zero_grad()
        wsam.step(closure)
    got = ours("wsam", net, data, rho=0.05, gamma=0.8, decouple=decouple)
    for a, b in zip(got, theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=2e-6, atol=2e-7)


# --- what every variant keeps -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["gsam", "looksam", "wsam", "vasso", "sam-on"])
def test_state_dict_round_trip_continues_in_lockstep(name: str) -> None:
    """Save after two steps, load into a fresh optimizer of a fresh copy: both go on equal."""
    net, data = model(12), batches(5)
    kwargs = {"k": 2} if name == "looksam" else {}

    def build(m: nn.Module) -> tuple[torch.optim.Optimizer, SharpnessAwareStep]:
        opt = zo.create(name, zo.params_for(name, m), lr=LR, momentum=MOMENTUM, **kwargs)
        return opt, SharpnessAwareStep(m, opt, F.cross_entropy)

    a = copy.deepcopy(net)
    opt_a, step_a = build(a)
    for x, y in data[:2]:
        step_a(x, y)
    b = copy.deepcopy(a)
    opt_b, step_b = build(b)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    step_b.load_state_dict(step_a.state_dict())
    for x, y in data[2:]:
        step_a(x, y)
        step_b(x, y)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_every_family_member_is_registered_with_its_z_filtered_form() -> None:
    for name in ("gsam", "looksam", "wsam", "vasso", "sam-on"):
        plain, filtered = zo.get_optimizer(name), zo.get_optimizer(f"zsharp-{name}")
        assert plain.reference and plain.reference in filtered.reference
        assert filtered.arg_names == plain.arg_names | {"percentile", "variant"}
        assert math.isfinite(float(plain.defaults["rho"]))
