"""ECE and the Hessian's top eigenvalue against independent float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from zsharp.pipeline.cell.metrics import (
    evaluate,
    expected_calibration_error,
    hessian_top_eigenvalue,
)


def ece_reference(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """Guo et al. 2017, Eq. 3, with bins ((b-1)/B, b/B], written as a plain loop."""
    n, total = len(confidence), 0.0
    for b in range(1, bins + 1):
        low, high = (b - 1) / bins, b / bins
        members = [
            (c, a)
            for c, a in zip(confidence, correct, strict=True)
            if (low < c <= high) or (b == 1 and c == 0.0)
        ]
        if members:
            conf = sum(c for c, _ in members) / len(members)
            acc = sum(a for _, a in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_ece_matches_reference(bins: int) -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.1, 1.0, 500)
    confidence[:20] = np.round(confidence[:20] * bins) / bins  # exactly on bin edges
    correct = rng.uniform(size=500) < confidence**2
    got = expected_calibration_error(torch.tensor(confidence), torch.tensor(correct), bins)
    assert got == pytest.approx(ece_reference(confidence, correct, bins), abs=1e-12)


def test_ece_extremes() -> None:
    confident_and_wrong = expected_calibration_error(torch.ones(10), torch.zeros(10, dtype=bool))
    assert confident_and_wrong == pytest.approx(1.0)
    calibrated = expected_calibration_error(
        torch.full((4,), 0.75), torch.tensor([True, True, True, False])
    )
    assert calibrated == pytest.approx(0.0)


def test_evaluate_loss_and_accuracy() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 50, 16)]
    result = evaluate(model, batches)
    with torch.no_grad():
        logits = model(x)
    assert result.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert result.accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert model.training  # restored


def test_hessian_of_least_squares_is_two_xtx_over_n() -> None:
    """L(w) = mean((Xw − y)²): H = 2 XᵀX / N exactly; compare with numpy's eigvalsh."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)) * np.array([3.0, 1, 1, 0.5, 0.2, 0.1])
    y = rng.normal(size=64)
    model = nn.Linear(6, 1, bias=False).double()
    batches = [
        (torch.tensor(x[i : i + 20]), torch.tensor(y[i : i + 20]).unsqueeze(1))
        for i in range(0, 64, 20)
    ]
    eigenvalue, _ = hessian_top_eigenvalue(
        model, F.mse_loss, batches, iterations=200, tolerance=1e-12
    )
    expected = np.linalg.eigvalsh(2 * x.T @ x / 64).max()
    assert eigenvalue == pytest.approx(expected, rel=1e-8)


def test_hessian_of_a_small_network_matches_autograd_hessian() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, sizes)
        w1, b1, w2, b2 = (c.view(s) for c, s in zip(chunks, shapes, strict=True))
        return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    flat = torch.cat([p.detach().flatten() for p in params])
    hessian = torch.autograd.functional.hessian(loss_of, flat).numpy()
    eigenvalues = np.linalg.eigvalsh(hessian)
    dominant = eigenvalues[np.argmax(np.abs(eigenvalues))]
    got, _ = hessian_top_eigenvalue(
        model,
        F.cross_entropy,
        [(x[:25], y[:25]), (x[25:], y[25:])],
        iterations=500,
        tolerance=1e-13,
    )
    assert got == pytest.approx(dominant, rel=1e-6)
