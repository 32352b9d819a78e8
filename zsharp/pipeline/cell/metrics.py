"""What a trained cell is judged by: accuracy and loss, calibration, and sharpness.

* :func:`evaluate` — test loss and accuracy, and the softmax outputs for calibration.
* :func:`expected_calibration_error` — ECE with equal-width confidence bins (Guo et al.
  2017, Eq. 3): ECE = Σ_b |B_b|/n · |acc(B_b) − conf(B_b)|.
* :func:`hessian_top_eigenvalue` — the dominant eigenvalue of the Hessian of the training
  loss, by power iteration on Hessian-vector products (Pearlmutter 1994): the flatness the
  SAM family aims for, measured rather than assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class Evaluation:
    """Mean loss, accuracy, and the per-sample softmax confidence and correctness."""

    loss: float
    accuracy: float
    confidence: Tensor
    correct: Tensor


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    autocast: Callable[[], object] | None = None,
) -> Evaluation:
    """Evaluate ``model`` (in eval mode) over ``batches``; one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum, confidences, corrects = None, [], []
    for x, y in batches:
        if autocast is not None:
            with autocast():  # type: ignore[attr-defined]
                logits = model(x)
        else:
            logits = model(x)
        logits = logits.float()
        batch_loss = F.cross_entropy(logits, y, reduction="sum")
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        confidence, prediction = logits.softmax(dim=1).max(dim=1)
        confidences.append(confidence)
        corrects.append(prediction == y)
    model.train(was_training)
    confidence = torch.cat(confidences).cpu()
    correct = torch.cat(corrects).cpu()
    n = len(correct)
    assert loss_sum is not None, "no batches to evaluate"
    return Evaluation(
        loss=float(loss_sum) / n,
        accuracy=float(correct.float().mean()),
        confidence=confidence,
        correct=correct,
    )


def expected_calibration_error(confidence: Tensor, correct: Tensor, bins: int = 15) -> float:
    """ECE over ``bins`` equal-width bins of confidence in (0, 1] (bin b = ((b−1)/B, b/B])."""
    confidence = confidence.double()
    correct = correct.double()
    # bin index: ceil(conf·B) − 1, so conf = b/B falls in bin b − 1 (right-closed bins)
    index = (torch.ceil(confidence * bins) - 1).clamp(0, bins - 1).long()
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return float((conf_sum - acc_sum).abs().sum() / len(confidence))


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: list[tuple[Tensor, Tensor]],
    iterations: int = 20,
    tolerance: float = 1e-3,
    seed: int = 0,
) -> tuple[float, int]:
    """Dominant eigenvalue λ of ∇²L(w), L the mean of ``loss_fn`` over ``batches``.

    Power iteration: v ← Hv/‖Hv‖ with Hv = ∇(∇L·v) computed exactly by double
    backpropagation, λ = v·Hv, until λ changes by less than ``tolerance`` relative (or
    ``iterations`` products). BatchNorm should be in eval mode so that L is a function of w
    alone. Returns (λ, Hessian-vector products used). Attention runs in PyTorch's math
    kernel here: the fused scaled-dot-product kernels have no second derivative.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return _power_iteration(model, loss_fn, batches, iterations, tolerance, seed)


def _power_iteration(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: list[tuple[Tensor, Tensor]],
    iterations: int,
    tolerance: float,
    seed: int,
) -> tuple[float, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    _normalise(v)
    n_total = sum(len(y) for _, y in batches)
    eigenvalue, used = 0.0, 0
    for used in range(1, iterations + 1):  # noqa: B007 (the count is returned)
        hv = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            loss = loss_fn(model(x), y) * (len(y) / n_total)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * vi).sum() for g, vi in zip(grads, v, strict=True))
            for acc, h in zip(hv, torch.autograd.grad(dot, params), strict=True):
                acc.add_(h)
        new = float(sum((h * vi).sum() for h, vi in zip(hv, v, strict=True)))
        v = hv
        _normalise(v)
        converged = abs(new - eigenvalue) <= tolerance * max(abs(new), 1e-12)
        eigenvalue = new
        if converged:
            break
    return eigenvalue, used


def _normalise(vectors: list[Tensor]) -> None:
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in vectors))
    for v in vectors:
        v.div_(norm.to(v.dtype))
