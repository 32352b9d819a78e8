"""Independent float64 references for the optimizers, written from the equations.

Nothing here imports zsharp: these are the formulas of SAM (Foret et al. 2021, Eq. 2),
ASAM (Kwon et al. 2021, Eq. 9), Friendly-SAM (Li et al. 2024, Eq. 8-9) and ZSharp (arXiv
2505.02369, Eq. 4-7, and the released main.py), computed with numpy in float64 one tensor
at a time with a full sort, the slow and obvious way.
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


def quantile_linear_float32_rank(values: np.ndarray, q: float) -> float:
    """torch.quantile(values, q) for float32 input: rank q*(n-1) computed in float32.

    The released code calls torch.quantile on a float32 tensor, which forms the rank in the
    input's dtype; the interpolation itself is done here in float64.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = v.size
    rank = np.float32(np.float32(q) * np.float32(n - 1))
    low, high = int(np.floor(rank)), int(np.ceil(rank))
    weight = float(rank) - low
    return float(v[low] + weight * (v[high] - v[low]))


def mask_official(g: np.ndarray, percentile: float) -> np.ndarray:
    """main.py: z with unbiased std + 1e-12, threshold torch.quantile(|z|, p/100), |z| > it."""
    g = np.asarray(g, dtype=np.float64).ravel()
    if g.size == 1:
        return np.zeros(1, dtype=bool)
    z = np.abs((g - g.mean()) / (g.std(ddof=1) + EPS))
    return z > quantile_linear_float32_rank(z, percentile / 100)


def epsilon(
    grads: list[np.ndarray],
    weights: list[np.ndarray],
    rhos: list[float],
    *,
    variant: str | None = None,
    percentile: float = 95.0,
    adaptive: bool = False,
    eta: float = 0.0,
) -> list[np.ndarray]:
    """ε of SAM/ASAM (variant None) or ZSharp ("paper", "official") for each tensor."""
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
            rho * ti**2 * d / (norm + EPS) for rho, ti, d in zip(rhos, t, direction, strict=True)
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
        out.append(rho * ti**2 * f / (norm + EPS) if norm > 0 else s)
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
