"""Independent float64 references for the optimizers, written from the equations.

Nothing here imports zsharp: these are the formulas of SAM (Foret et al. 2021, Eq. 2),
ASAM (Kwon et al. 2021, Eq. 9), Friendly-SAM (Li et al. 2024, Eq. 8-9) and ZSharp (arXiv
2505.02369, Eq. 4-7, and the released main.py), computed with numpy in float64 one tensor
at a time with a full sort, the slow and obvious way; and a whole SAM + SGD step with the
descent gradient clipped, on a linear model whose gradient is written out by hand.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

EPS = 1e-12


def mask_paper(g: np.ndarray, percentile: float) -> np.ndarray:
    """Keep the entries whose |z| is at least the k-th largest, k = ceil(n (100 - p) / 100)."""
    g = np.asarray(g, dtype=np.float64).ravel()
    n = g.size
    std = g.std()
    if std == 0:  # every |z| is equal (0/0 read as a tie): all tie with the k-th largest
        return np.ones(n, dtype=bool)
    z = np.abs((g - g.mean()) / std)
    k = max(1, math.ceil(Fraction(n) * (100 - Fraction(str(percentile))) / 100))
    tau = np.sort(z)[::-1][k - 1]
    return z >= tau


def quantile_linear_float32(values: np.ndarray, q: float) -> float:
    """torch.quantile(values, q) for a float32 input, with torch's rank arithmetic.

    torch rounds q to the input's dtype (float32), forms the rank q*(n-1) in float64 and
    casts the weight rank - floor(rank) back to float32 (torch 2.14, Sorting.cpp); the
    interpolation itself is done here in float64.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = v.size
    rank = float(np.float32(q)) * (n - 1)
    low, high = math.floor(rank), math.ceil(rank)
    weight = float(np.float32(rank - low))
    return float(v[low] + weight * (v[high] - v[low]))


def mask_official(g: np.ndarray, percentile: float) -> np.ndarray:
    """main.py: z with unbiased std + 1e-12, threshold torch.quantile(|z|, p/100), |z| > it."""
    g = np.asarray(g, dtype=np.float64).ravel()
    if g.size == 1:
        return np.zeros(1, dtype=bool)
    z = np.abs((g - g.mean()) / (g.std(ddof=1) + EPS))
    return z > quantile_linear_float32(z, percentile / 100)


def epsilon(
    grads: list[np.ndarray],
    weights: list[np.ndarray],
    rhos: list[float],
    *,
    variant: str | None = None,
    percentile: float = 95.0,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = EPS,
) -> list[np.ndarray]:
    """ε of SAM/ASAM (variant None) or ZSharp ("paper", "official") for each tensor; ``eps``
    guards the normalisations (a SAM variant's own guard: VaSSO's 1e-7)."""
    g = [np.asarray(x, dtype=np.float64) for x in grads]
    t = [
        np.abs(np.asarray(w, dtype=np.float64)) + eta if adaptive else np.ones_like(x)
        for w, x in zip(weights, g, strict=True)
    ]

    def sam_share(direction: list[np.ndarray]) -> list[np.ndarray]:
        norm = math.sqrt(
            sum(float(np.sum((ti * d) ** 2)) for ti, d in zip(t, direction, strict=True))
        )
        return [
            rho * ti**2 * d / (norm + eps) for rho, ti, d in zip(rhos, t, direction, strict=True)
        ]

    if variant is None:
        return sam_share(g)
    if variant == "paper":
        filtered = [x * mask_paper(x, percentile).reshape(x.shape) for x in g]
        if all(not np.any(f) for f in filtered):
            filtered = g
        return sam_share(filtered)
    assert variant == "official"
    share = sam_share(g)
    out = []
    for rho, ti, x, s in zip(rhos, t, g, share, strict=True):
        if x.ndim <= 1:
            out.append(s)
            continue
        f = x * mask_official(x, percentile).reshape(x.shape)
        norm = float(np.linalg.norm(ti * f))
        out.append(rho * ti**2 * f / (norm + eps) if norm > 0 else s)
    return out


def friendly_directions(
    grads_per_step: list[list[np.ndarray]], sigma: float, lmbda: float
) -> list[list[np.ndarray]]:
    """Friendly-SAM's d_t = g_t - sigma m_{t-1}, m_t = lmbda m_{t-1} + (1 - lmbda) g_t."""
    out, m = [], None
    for grads in grads_per_step:
        g = [np.asarray(x, dtype=np.float64) for x in grads]
        if m is None:
            out.append(g)
            m = [x.copy() for x in g]
        else:
            out.append([x - sigma * mi for x, mi in zip(g, m, strict=True)])
            m = [lmbda * mi + (1 - lmbda) * x for mi, x in zip(m, g, strict=True)]
    return out


def linear_mse_gradient(
    w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """∇ of L(W, b) = mean((x Wᵀ + b - y)²) over every entry: (2/(N k)) (Rᵀx, Σ R)."""
    r = x @ w.T + b - y
    scale = 2.0 / r.size
    return scale * r.T @ x, scale * r.sum(axis=0)


def clipped_sam_sgd_step(
    w: np.ndarray,
    b: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    rho: float,
    lr: float,
    max_norm: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One SAM step (Eq. 2) with plain SGD on the linear MSE model, the descent gradient
    g' = ∇L(w + ε) clipped to global norm max_norm as clip_grad_norm_ does:
    g' · min(1, max_norm / (‖g'‖ + 1e-6))."""
    w, b, x, y = (np.asarray(a, dtype=np.float64) for a in (w, b, x, y))
    gw, gb = linear_mse_gradient(w, b, x, y)
    scale = rho / (math.sqrt(float(np.sum(gw**2) + np.sum(gb**2))) + EPS)
    gw2, gb2 = linear_mse_gradient(w + scale * gw, b + scale * gb, x, y)
    norm = math.sqrt(float(np.sum(gw2**2) + np.sum(gb2**2)))
    clip = min(1.0, max_norm / (norm + 1e-6))
    return w - lr * clip * gw2, b - lr * clip * gb2


def keep_count_paper(n: int, percentile: float) -> int:
    """The paper rule's k = ceil(n (100 - p) / 100), at least 1, in exact arithmetic."""
    return max(1, math.ceil(Fraction(n) * (100 - Fraction(str(percentile))) / 100))


def diagnostics(
    grads: list[np.ndarray],
    directions: list[np.ndarray],
    weights: list[np.ndarray],
    rhos: list[float],
    *,
    variant: str | None = None,
    percentile: float = 95.0,
    adaptive: list[bool] | None = None,
    eta: float = 0.0,
    eps: float = EPS,
) -> dict[str, float]:
    """One ascent's diagnostics, from the equations, with ε built here from scratch
    (``eps``: the guard of the normalisation, a variant's own: VaSSO 1e-7, SAM-ON 1e-16).

    ``directions`` are the ascent directions d (the gradients g, or Friendly-SAM's
    g - sigma m), ``adaptive[i]`` whether tensor i has ASAM's T = |w| + eta (else T = 1).
    Returns ‖g‖, ‖ε‖ (SAM Eq. 2 / ASAM Eq. 9 / ZSharp Eq. 7, or main.py's per-tensor ε),
    the kept fraction sum|m| / sum n of the Z-score masks (Eq. 5; the official variant's
    1-D tensors count as kept; 1 with no filter) and cos(d~, d) = <d~, d> / (‖d~‖ ‖d‖) with
    d~ the filtered direction ε is built from (fallbacks to d included; 1 when d = 0).
    """
    g = [np.asarray(x, dtype=np.float64) for x in grads]
    d = [np.asarray(x, dtype=np.float64) for x in directions]
    flags = adaptive or [False] * len(d)
    t = [
        np.abs(np.asarray(w, dtype=np.float64)) + eta if a else np.ones_like(x)
        for w, x, a in zip(weights, d, flags, strict=True)
    ]
    if variant is None:
        masks = [np.ones(x.shape, dtype=bool) for x in d]
    elif variant == "paper":
        masks = [mask_paper(x, percentile).reshape(x.shape) for x in d]
    else:
        assert variant == "official"
        masks = [
            mask_official(x, percentile).reshape(x.shape)
            if x.ndim > 1
            else np.ones(x.shape, dtype=bool)
            for x in d
        ]
    filtered = [x * m for x, m in zip(d, masks, strict=True)]

    def sam_share(direction: list[np.ndarray]) -> list[np.ndarray]:
        norm = math.sqrt(
            sum(float(np.sum((ti * x) ** 2)) for ti, x in zip(t, direction, strict=True))
        )
        return [
            rho * ti**2 * x / (norm + eps) for rho, ti, x in zip(rhos, t, direction, strict=True)
        ]

    if variant == "official":
        used = [x if x.ndim <= 1 or not np.any(f) else f for x, f in zip(d, filtered, strict=True)]
        share = sam_share(d)
        eps = [
            s if x.ndim <= 1 or not np.any(f) else rho * ti**2 * f / (np.linalg.norm(ti * f) + eps)
            for rho, ti, x, f, s in zip(rhos, t, d, filtered, share, strict=True)
        ]
    else:
        used = d if all(not np.any(f) for f in filtered) else filtered
        eps = sam_share(used)

    def norm(xs: list[np.ndarray]) -> float:
        return math.sqrt(sum(float(np.sum(x**2)) for x in xs))

    inner = sum(float(np.sum(u * x)) for u, x in zip(used, d, strict=True))
    d_norm = norm(d)
    return {
        "grad_norm": norm(g),
        "epsilon_norm": norm(eps),
        "kept_fraction": sum(int(m.sum()) for m in masks) / sum(m.size for m in masks),
        "cosine": inner / (norm(used) * d_norm) if d_norm > 0 else 1.0,
    }
