"""The released code's recipe, option by option, against independent transcriptions of it.

Each reference here is written from the released code (YUNBLAK/Sharpness-Aware-Minimization-
with-Z-Score-Gradient-Filtering: main.py, vgg.py, resnets.py), in float64 where it is
arithmetic, or is the released code's own dependency (warmup_scheduler for the LR).
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from tests.workflow_helpers import REPO
from zsharp.models import build_model
from zsharp.optim import create
from zsharp.pipeline.cell.config import cell_config
from zsharp.pipeline.cell.schedule import epoch_multiplier, lr_lambda
from zsharp.pipeline.cell.trainer import param_groups
from zsharp.pipeline.grid.expand import load_grid

# advertorch NormalizeByChannelMeanStd in the released vgg.py and resnets.py
RELEASED_MEAN = (0.4914, 0.4822, 0.4465)
RELEASED_STD = (0.2470, 0.2435, 0.2616)


def official_cell(dataset: str = "cifar10", model: str = "resnet20", label: str = "asam"):
    grid = load_grid(yaml.safe_load((REPO / "config" / "official.yaml").read_text()))
    return grid.cell(dataset, model, label, 52).config


def test_official_learning_rate_of_every_epoch_is_the_released_schedulers() -> None:
    """GradualWarmupScheduler(multiplier=1, total_epoch=5, after_scheduler=StepLR(30, 0.75)),
    stepped once per epoch as Lightning steps an epoch-interval scheduler."""
    warmup_scheduler = pytest.importorskip("warmup_scheduler")
    cfg = official_cell()
    lr = cfg.lr
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = warmup_scheduler.GradualWarmupScheduler(
        optimizer, multiplier=1.0, total_epoch=cfg.warmup_epochs,
        after_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.75),
    )  # fmt: skip
    released = []
    for _ in range(cfg.epochs):
        released.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [lr * epoch_multiplier(cfg, e) for e in range(cfg.epochs)]
    assert ours == pytest.approx(released, rel=1e-12, abs=0)
    # the facts the README states: 0 at epoch 0, decays at 36, 66, …, 186
    decays = [e for e in range(1, cfg.epochs) if released[e] < released[e - 1]]
    assert released[0] == 0 and decays == [36, 66, 96, 126, 156, 186]
    # every step of an epoch trains at that epoch's rate
    factor = lr_lambda(cfg, steps_per_epoch=7)
    assert all(
        factor(7 * e + s) == epoch_multiplier(cfg, e) for e in range(cfg.epochs) for s in range(7)
    )


def test_paper_schedule_decays_every_ten_epochs_after_a_per_step_warmup() -> None:
    grid = load_grid(yaml.safe_load((REPO / "config" / "paper.yaml").read_text()))
    cfg = grid.cell("cifar10", "resnet20", "zsharp", 0).config
    n = 3
    factor = lr_lambda(cfg, steps_per_epoch=n)
    for step in range(cfg.epochs * n):
        # (s + 1) / (W·n) reaches 1 at the warm-up's last step; then ×0.75 every 10 epochs
        warm = step < 5 * n
        expected = (step + 1) / (5 * n) if warm else 0.75 ** ((step // n - 5) // 10)
        assert factor(step) == pytest.approx(expected, rel=1e-15), step
    assert cfg.precision == "fp32"


class ReleasedVGG(nn.Module):
    """vgg.py of the released code, transcribed: cfg D without the fifth max-pool,
    AdaptiveAvgPool2d((1, 1)), Linear(512, n), inputs normalised with CIFAR-10's constants."""

    D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in self.D:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)
        self.mean = torch.tensor(RELEASED_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        self.std = torch.tensor(RELEASED_STD, dtype=torch.float64).view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x)) / self.std.to(x)
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def test_released_vgg_head_gives_the_transcriptions_logits() -> None:
    cfg = official_cell(model="vgg16_bn")
    torch.manual_seed(0)
    ours = build_model("vgg16_bn", 10, 32, 3, **cfg.model_args).double().eval()
    reference = ReleasedVGG(10).double().eval()
    # the same weights, tensor by tensor in order (both follow the cfg list)
    for mine, theirs in zip(
        ours.state_dict().values(), reference.state_dict().values(), strict=True
    ):
        theirs.copy_(mine)
    for m in ours.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    reference.load_state_dict(
        dict(zip(reference.state_dict(), ours.state_dict().values(), strict=True))
    )
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(ours(x), reference(x), rtol=1e-12, atol=1e-12)
    # and the default head is another network (five max-pools)
    default = build_model("vgg16_bn", 10, 32, 3).double().eval()
    default.load_state_dict(ours.model.state_dict())
    assert not torch.allclose(default(x), reference(x), atol=1e-6)


def test_in_model_normalisation_uses_the_released_constants() -> None:
    torch.manual_seed(0)
    wrapped = build_model("resnet20", 10, 32, 3, input_norm="cifar10").double().eval()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    mean = torch.tensor(RELEASED_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(RELEASED_STD, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(wrapped(x), wrapped.model((x - mean) / std), rtol=0, atol=0)
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in wrapped.model.state_dict()}


def released_asam_epsilon(model: nn.Module, rho: float, eta: float) -> dict[str, torch.Tensor]:
    """ASAM.ascent_step of the released main.py, transcribed in float64: tensors whose name
    contains "weight" are scaled by T = |w| + η (twice: T·g for the norm, T²·g for ε), the
    others by 1; one norm over every tensor, plus 1e-16."""
    scaled = {}
    for name, p in model.named_parameters():
        g = p.grad.double()
        t = p.detach().double().abs() + eta if "weight" in name else None
        scaled[name] = (g * t if t is not None else g, t)
    norm = (
        torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(s) for s, _ in scaled.values()])
        )
        + 1e-16
    )
    return {name: (s * t if t is not None else s) * (rho / norm) for name, (s, t) in scaled.items()}


def test_asam_scaling_weights_only_matches_the_released_ascent_over_three_steps() -> None:
    cfg = official_cell(label="asam")
    assert cfg.adaptive_scope == "weights" and cfg.opt_args["rho"] == 0.5
    cfg = copy.deepcopy(cfg)
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 32, 3, **cfg.model_args).double()
    lr = 0.01
    optimizer = create("asam", param_groups(model, cfg), base="sgd", lr=lr, rho=0.5, eta=0.01)
    x, y = torch.rand(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        expected = released_asam_epsilon(model, rho=0.5, eta=0.01)
        optimizer.first_step(zero_grad=True)
        for name, p in model.named_parameters():
            assert torch.allclose(p - before[name], expected[name], rtol=1e-9, atol=1e-15), name
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.second_step(zero_grad=True)
        for name, p in model.named_parameters():  # SGD with the gradient at w + ε
            assert torch.allclose(p, before[name] - lr * grads[name], rtol=0, atol=1e-15), name


def test_scaling_weights_only_is_refused_for_a_non_adaptive_optimizer() -> None:
    with pytest.raises(ValueError, match=r"^adaptive_scope"):
        cell_config("digits", "resnet20", "sam", adaptive_scope="weights", deep=False)


def released_zsharp_epsilon(model: nn.Module, rho: float, alpha: float) -> list[torch.Tensor]:
    """SAM.first_step of the released main.py with --zsam, transcribed (adaptive off): a
    tensor with ndim > 1 is filtered by |z| > quantile(|z|, alpha) and normalised on its own
    (the SAM share if nothing survives); every other tensor gets the SAM share."""
    grads = [p.grad.detach().clone() for p in model.parameters()]
    grad_norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
    scale = rho / (grad_norm + 1e-12)
    out = []
    for g in grads:
        if g.ndim > 1:
            z = (g - g.mean()) / (g.std() + 1e-12)
            mask = z.abs() > torch.quantile(z.abs(), alpha)
            filtered = g.clone()
            filtered[~mask] = 0.0
            norm = filtered.norm(p=2)
            out.append(rho * filtered / (norm + 1e-12) if norm > 0 else g * scale)
        else:
            out.append(g * scale)
    return out


def released_fsam_epsilon(
    model: nn.Module, state: dict[int, torch.Tensor], rho: float, sigma: float, lmbda: float
) -> list[torch.Tensor]:
    """FriendlySAM.first_step of the released main.py, transcribed (its state: momentum)."""
    directions = []
    for i, p in enumerate(model.parameters()):
        grad = p.grad.detach().clone()
        d = grad.clone()
        if i not in state:
            state[i] = grad
        else:
            d -= state[i] * sigma
            state[i] = state[i] * lmbda + grad * (1 - lmbda)
        directions.append(d)
    norm = torch.norm(torch.stack([d.norm(p=2) for d in directions]), p=2)
    return [d * (rho / (norm + 1e-12)) for d in directions]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "vit"])
@pytest.mark.parametrize("method", ["zsharp", "fsam"])
def test_official_epsilon_over_three_steps_is_the_released_codes(name: str, method: str) -> None:
    """ε of our official ZSharp and our F-SAM, built from config/official.yaml, against
    transcriptions of the released optimizers, float64, over three SGD steps."""
    cfg = official_cell(model=name, label=method)
    torch.manual_seed(0)
    model = build_model(name, 10, 32, 3, **cfg.model_args).double()
    optimizer = create(method, model.parameters(), base="sgd", lr=0.01, **cfg.opt_args)
    x, y = torch.rand(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    state: dict[int, torch.Tensor] = {}
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        if method == "zsharp":
            expected = released_zsharp_epsilon(model, rho=0.05, alpha=0.95)
        else:
            expected = released_fsam_epsilon(model, state, rho=0.05, sigma=1.0, lmbda=0.9)
        optimizer.first_step(zero_grad=True)
        for p, w, e in zip(model.parameters(), before, expected, strict=True):
            assert torch.allclose(p - w, e, rtol=1e-9, atol=1e-14)
        F.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
