"""Layer-wise Z-score gradient filtering, the core of ZSharp (arXiv 2505.02369, Sec. 3).

For a parameter tensor ("layer") ℓ with gradient g_ℓ of n entries the paper defines

    z_ℓ = (g_ℓ − mean(g_ℓ)) / std(g_ℓ)                                  (Eq. 4)
    m_ℓ = 1[|z_ℓ| ≥ Q_p(|z_ℓ|)],  g̃_ℓ = g_ℓ ⊙ m_ℓ                        (Eq. 5–6)

and keeps the components whose |z| lies in the top (100 − p) % of the layer. Two rules for
the set of kept entries are implemented, one per variant:

``variant="paper"`` (default)
    keep the k = ⌈n·(100 − p)/100⌉ entries of largest |z|, and every entry tied with the
    k-th largest: ``m = |z| ≥ τ`` with τ the k-th largest |z| (computed exactly, k in
    rational arithmetic from the decimal value of p). p = 0 keeps every entry. Within one
    tensor |z| is |g − mean(g)| divided by one positive number, so the order (and the tie
    set) is computed on |g − mean(g)| directly: dividing by std cannot change which entries
    survive and would only add rounding that can create false ties. A tensor whose entries
    are all equal has |g − mean| identical everywhere, so every entry ties and is kept.
    Every tensor is filtered, biases and norm layers included, as the equations say.

``variant="official"``
    the released code (``main.py`` of YUNBLAK/Sharpness-Aware-Minimization-with-Z-Score-
    Gradient-Filtering): z uses the unbiased std plus 1e-12, the threshold is
    ``torch.quantile(|z|, p/100)`` (linear interpolation between order statistics) and the
    mask is strict, ``|z| > threshold``; only tensors with ``ndim > 1`` are filtered. All
    entries equal means |z| is constant, nothing is strictly above it, nothing is kept.
    The kept set is main.py's exactly, for every size: z is rounded as main.py rounds it
    and the threshold is torch.quantile's, rank arithmetic included (:func:`official_rank`).

Both are computed without ``torch.quantile`` (a full sort, and limited to 2^24 elements in
older releases) and without host synchronisation: tensors of equal size are stacked into
one matrix so a handful of batched kernels (mean, abs, top-k or k-th value, mask) serve a
whole group of layers; the threshold is the same order statistic ``torch.quantile`` uses,
and the official threshold is interpolated with the same ``lerp`` in float32.

The filter also builds ε from the filtered directions (:meth:`ZScoreFilter.epsilon`, Eq. 7
and the released code's per-tensor normalisation): a SAM-family optimizer given
``zfilter=`` hands it the ascent step.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from zsharp.optim.sam import AscentGroup, global_norm, sam_epsilon, tensor_norms

Variant = Literal["paper", "official"]
VARIANTS: tuple[str, ...] = ("paper", "official")

# Stacked rows of one chunk hold at most this many elements, bounding the temporaries of
# the filter (|g − mean|, the mask, the selection's workspace) to a few times 16 MB.
_CHUNK_ELEMENTS = 1 << 22
# top-k beats k-th-value selection for the small k of typical layers (measured on CPU:
# ResNet-56's layers 10 ms vs 20 ms); for very large k a selection without sorting wins.
_TOPK_MAX_K = 16384
# The official std's float64 temporaries hold at most this many elements (2 MiB).
_STD_BLOCK_ELEMENTS = 1 << 18
# The released code's guard against a zero standard deviation.
OFFICIAL_STD_EPS = 1e-12


def check_percentile(percentile: float) -> float:
    """Return ``percentile`` as a float, or raise a ValueError that names it."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
        raise ValueError(f"percentile must be a number in [0, 100), got {percentile!r}")
    if not 0.0 <= float(percentile) < 100.0:
        raise ValueError(f"percentile must be in [0, 100), got {percentile!r}")
    return float(percentile)


def check_variant(variant: str) -> str:
    """Return ``variant``, or raise a ValueError that names it and the valid values."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    return variant


@functools.lru_cache(maxsize=4096)
def paper_keep_count(n: int, percentile: float) -> int:
    """k = ⌈n·(100 − p)/100⌉, the number of largest-|z| entries the paper rule keeps.

    Computed in exact rational arithmetic from the decimal value of p, so p = 95 on
    n = 20 keeps exactly 1 entry rather than 2 through a rounding error.
    """
    keep = Fraction(n) * (100 - Fraction(str(float(percentile)))) / 100
    return max(1, min(n, math.ceil(keep)))


@functools.lru_cache(maxsize=4096)
def official_rank(n: int, percentile: float, float64: bool = False) -> tuple[int, int, float]:
    """Order statistics (0-based, ascending) and weight of ``torch.quantile(x, p/100)``.

    For n values of dtype float32 (``float64=False``) or float64, torch's
    ``quantile_compute`` (aten/src/ATen/native/Sorting.cpp) does, as traced on torch 2.14:

    1. q = p/100 becomes a scalar tensor of the input's dtype: float32 rounds it, 0.95 →
       0.949999988…;
    2. rank = q·(n − 1) in float64;
    3. low = trunc(rank), high = ceil(rank), weight = rank − low cast to the input's dtype;
    4. the threshold is ``lerp(sorted[low], sorted[high], weight)`` in the input's dtype.

    So where q·(n − 1) is a whole number r and the float32 q is below q (n ≡ 1 mod 20 at
    p = 95, …) the rank is just under r: low = r − 1 with a weight of 1 − 2⁻²² or so, and
    the threshold can fall below sorted[r], which is then kept too. (Releases before
    pytorch/pytorch#187574 formed the rank in float32, which rounds it back to r, and
    capped n at 2^24.)
    """
    q = percentile / 100.0
    if not float64:
        q = float(np.float32(q))
    rank = q * (n - 1)  # a Python float is an IEEE double, as torch's float64 rank
    low = int(rank)
    weight = rank - low
    if not float64:
        weight = float(np.float32(weight))
    return low, min(math.ceil(rank), n - 1), weight


def _largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest value of every row of ``values`` (shape [m, 1])."""
    n = values.shape[1]
    if k <= _TOPK_MAX_K:
        # the smallest of the k largest; leaving them unsorted saves a sort of k values
        return values.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    return values.kthvalue(n - k + 1, dim=1, keepdim=True).values


def _keep_rows_paper(rows: Tensor, percentile: float, tensors: Sequence[Tensor]) -> Tensor | None:
    """Mask of the entries of each row kept by the paper rule (None: every entry)."""
    n = rows.shape[1]
    k = paper_keep_count(n, percentile)
    if k == n:  # p small enough to keep every entry: nothing to do (a static branch)
        return None
    deviation = (rows - rows.mean(dim=1, keepdim=True)).abs_()
    return deviation >= _largest(deviation, k)


def _official_z(rows: Tensor, tensors: Sequence[Tensor], per_tensor: bool | None = None) -> Tensor:
    """|z| = |g − mean(g)| / (std(g) + 1e-12) of each row, bit for bit as ``main.py``.

    ``tensors`` are the rows' tensors. The z of entries that (nearly) tie decide the kept
    set when torch.quantile's threshold falls between them, so mean and unbiased std must
    round as main.py's ``grad.mean()`` and ``grad.std()`` do. ``per_tensor`` (default: off
    the CPU) takes each tensor's std on its own too.
    """
    n = rows.shape[1]
    tensors = [t.to(rows.dtype) for t in tensors]  # 16-bit ones in float32, as the rows
    # a float32 sum's rounding depends on its order, which depends on the tensor's shape
    # and (CPU, n > 32768) the number of threads: one mean per tensor, as main.py's
    mean = torch.stack([t.mean() for t in tensors]).view(-1, 1)
    if per_tensor is None:
        per_tensor = rows.device.type != "cpu"
    if per_tensor:
        std = torch.stack([t.std() for t in tensors]).view(-1, 1)
    else:
        # torch's CPU std of a whole tensor accumulates (x − mean)² in float64, whose
        # float32 rounding does not depend on the order: so do we, many rows at once (it is
        # the slow reduction tensor by tensor). x − mean in float64 is exact; the float64
        # copies are made a few rows at a time, to keep the step's peak memory down.
        step = max(1, _STD_BLOCK_ELEMENTS // n)
        std = torch.cat(
            [
                torch.linalg.vector_norm(
                    block.to(torch.float64, copy=True).sub_(block_mean.double()),
                    dim=1,
                    keepdim=True,
                )
                for block, block_mean in zip(rows.split(step), mean.split(step), strict=True)
            ]
        )
        std = std.div_(math.sqrt(n - 1)).to(rows.dtype)
    return (rows - mean).div_(std + OFFICIAL_STD_EPS).abs_()


def _keep_rows_official(rows: Tensor, percentile: float, tensors: Sequence[Tensor]) -> Tensor:
    """Mask of the entries of each row kept by the released code's rule."""
    n = rows.shape[1]
    if n == 1:  # the unbiased std of one value is NaN: the released code keeps nothing
        return torch.zeros_like(rows, dtype=torch.bool)
    z = _official_z(rows, tensors)
    low, high, weight = official_rank(n, percentile, rows.dtype == torch.float64)
    # order statistics low and high (0-based, ascending) are the two smallest of the
    # n − low largest values
    if n - low <= _TOPK_MAX_K:
        top = z.topk(n - low, dim=1, sorted=False).values
        pair = top.topk(min(2, n - low), dim=1, largest=False).values  # ascending
        v_low, v_high = pair[:, :1], pair[:, high - low : high - low + 1]
    else:
        v_low = z.kthvalue(low + 1, dim=1, keepdim=True).values
        v_high = z.kthvalue(high + 1, dim=1, keepdim=True).values if high != low else v_low
    # a NaN threshold (NaN gradients) keeps nothing, as the comparison in main.py does
    return z > torch.lerp(v_low, v_high, weight)


_KEEP_ROWS = {"paper": _keep_rows_paper, "official": _keep_rows_official}


@dataclass(frozen=True)
class ZScoreFilter:
    """The Z-score filter, composable with any SAM-family optimizer of ``zsharp.optim``.

    ``percentile`` is p of the paper (95: keep the top 5 % of each layer); a param group
    may override it with its own ``"percentile"`` entry. ``variant`` picks the rule for the
    kept set and the normalisation of ε (see the module docstring and :meth:`epsilon`).
    """

    percentile: float = 95.0
    variant: Variant = "paper"

    def __post_init__(self) -> None:
        check_percentile(self.percentile)
        check_variant(self.variant)

    def filters(self, tensor: Tensor) -> bool:
        """Whether this variant filters ``tensor`` (official: only tensors with ndim > 1)."""
        return self.variant == "paper" or tensor.ndim > 1

    # --- what SAM asks of a filter (zsharp.optim.sam.AscentFilter) ------------------------

    def group_defaults(self) -> dict[str, Any]:
        """p for the param groups that do not set their own ``"percentile"``."""
        return {"percentile": self.percentile}

    def check_group(self, group: dict[str, Any]) -> None:
        """Raise a ValueError if the group's ``"percentile"`` is not in [0, 100)."""
        check_percentile(group["percentile"])

    def epsilon(
        self,
        groups: list[AscentGroup],
        device: torch.device,
        stats: dict[str, Tensor] | None = None,
    ) -> list[Tensor]:
        """ε from the filtered directions d̃ = d ⊙ m of every tensor of ``groups``.

        ``paper`` (Eq. 7): ε_ℓ = ρ · T_ℓ² ⊙ d̃_ℓ / (‖T ⊙ d̃‖₂ + 1e-12), one norm over the
        whole model, so ‖ε‖ = ρ; if d̃ is zero everywhere, d is used instead.

        ``official`` (the released code): each tensor with ndim > 1 is normalised on its
        own, ε_ℓ = ρ · T_ℓ² ⊙ d̃_ℓ / (‖T_ℓ ⊙ d̃_ℓ‖₂ + 1e-12), falling back to the SAM share
        ρ · T_ℓ² ⊙ d_ℓ / (‖T ⊙ d‖₂ + 1e-12) when d̃_ℓ = 0; 1-D tensors always get the SAM
        share. ‖ε‖ is then about ρ·√(number of filtered tensors). With T = 1 (no ASAM) this
        is ``main.py``'s ``first_step``.

        With ``stats`` (diagnostics on, see :class:`~zsharp.optim.sam.AscentFilter`) it
        also reports ``"kept"``, Σ_ℓ |m_ℓ| (an unfiltered 1-D tensor of the official
        variant counts whole), and ``"filtered_norm"``, ‖d̃‖ of the direction ε is built
        from: d where the paper's d̃ is all zeros; per tensor for the official variant, d_ℓ
        for 1-D tensors and where d̃_ℓ = 0. The paper variant reuses the ‖d̃‖ of its
        fallback test; the count sums the masks the filter builds anyway.
        """
        if self.variant == "paper":
            return self._epsilon_paper(groups, device, stats)
        return self._epsilon_official(groups, device, stats)

    def _filtered(
        self,
        groups: list[AscentGroup],
        select: Callable[[Tensor], bool],
        kept: list[Tensor | int] | None = None,
    ) -> list[Tensor]:
        """d̃ = d ⊙ m for the directions ``select`` picks, each with its group's p."""
        chosen = [
            (d, float(group.group["percentile"]))
            for group in groups
            for d in group.direction
            if select(d)
        ]
        return self.apply([d for d, _ in chosen], [p for _, p in chosen], kept=kept)

    def _epsilon_paper(
        self,
        groups: list[AscentGroup],
        device: torch.device,
        stats: dict[str, Tensor] | None = None,
    ) -> list[Tensor]:
        kept: list[Tensor | int] | None = None if stats is None else []
        filtered = self._filtered(groups, lambda _: True, kept)
        directions = [g.direction for g in groups]
        flat_d = [d for ds in directions for d in ds]
        # d̃ + 1[d̃ = 0]·d: d̃ itself, or d when nothing survived (then d̃ is all zeros)
        filtered_norm = global_norm(filtered, device)
        nothing_kept = filtered_norm == 0
        if stats is not None:
            stats["kept"] = _total(kept, device)
            d_norm = stats["direction_norm"]
            stats["filtered_norm"] = torch.where(
                nothing_kept, d_norm.to(filtered_norm), filtered_norm
            )
        fallback = nothing_kept.to(torch.float32)
        torch._foreach_addcmul_(filtered, flat_d, [fallback.to(d) for d in flat_d])
        chunks, start = [], 0
        for ds in directions:
            chunks.append(filtered[start : start + len(ds)])
            start += len(ds)
        return sam_epsilon(groups, chunks, device, owned=True)

    def _epsilon_official(
        self,
        groups: list[AscentGroup],
        device: torch.device,
        stats: dict[str, Tensor] | None = None,
    ) -> list[Tensor]:
        epsilon = sam_epsilon(groups, [g.direction for g in groups], device)  # SAM shares
        kept: list[Tensor | int] | None = None if stats is None else []
        filtered = iter(self._filtered(groups, self.filters, kept))
        shares = iter(epsilon)
        # diagnostics: ‖d̃_ℓ‖ of the direction each tensor's ε is built from
        used_norms: list[Tensor] = []
        d_norms = iter(
            [] if stats is None else tensor_norms([d for g in groups for d in g.direction])
        )
        for group in groups:
            scales = group.scale or [None] * len(group.direction)
            for d, scale in zip(group.direction, scales, strict=True):
                share = next(shares)
                d_norm = next(d_norms, None)
                if not self.filters(d):
                    if kept is not None and d_norm is not None:
                        kept.append(d.numel())
                        used_norms.append(d_norm.to(device))
                    continue
                d_tilde = next(filtered)
                td = d_tilde if scale is None else d_tilde * scale
                tilde_norm = torch.linalg.vector_norm(d_tilde)
                nonzero = tilde_norm > 0
                if d_norm is not None:
                    used_norms.append(
                        torch.where(nonzero, tilde_norm, d_norm.to(tilde_norm)).to(device)
                    )
                radius = group.rho / (torch.linalg.vector_norm(td) + group.eps)
                a = torch.where(nonzero, radius, 0.0)
                # ε_ℓ = a·T²d̃ where d̃ ≠ 0, else the SAM share already in `share`
                td.mul_(a.to(td.dtype))
                if scale is not None:
                    td.mul_(scale)
                share.mul_(nonzero.logical_not().to(share.dtype)).add_(td)
        if stats is not None:
            stats["kept"] = _total(kept, device)
            stats["filtered_norm"] = torch.linalg.vector_norm(torch.stack(used_norms))
        return epsilon

    @torch.no_grad()
    def apply(
        self,
        tensors: Sequence[Tensor],
        percentiles: Sequence[float],
        *,
        kept: list[Tensor | int] | None = None,
    ) -> list[Tensor]:
        """Filtered copies g̃_ℓ = g_ℓ ⊙ m_ℓ of ``tensors`` (the inputs are not modified).

        ``percentiles[i]`` is p for ``tensors[i]``. Every tensor given is filtered; callers
        select the tensors with :meth:`filters`. The result for tensor i is a view into a
        buffer shared by the tensors of its size, in float32 (float64 for float64 tensors):
        16-bit gradients are upcast, since the ε later built from them would underflow.
        A ``kept`` list receives the number of entries the masks keep, one term per batch
        of tensors (a 0-d int64 tensor, or an int where every entry is kept); their sum is
        Σ_ℓ |m_ℓ|.
        """
        keep_rows = _KEEP_ROWS[self.variant]
        out: list[Tensor | None] = [None] * len(tensors)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            groups[(t.numel(), t.dtype, t.device, float(percentiles[i]))].append(i)
        for (n, dtype, _device, percentile), members in groups.items():
            rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
            compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            for start in range(0, len(members), rows_per_chunk):
                chunk = members[start : start + rows_per_chunk]
                rows = torch.stack([tensors[i].reshape(-1) for i in chunk]).to(compute_dtype)
                keep = keep_rows(rows, percentile, [tensors[i] for i in chunk])
                if keep is not None:
                    if kept is not None:
                        kept.append(keep.sum())
                    rows.masked_fill_(keep.logical_not_(), 0.0)
                elif kept is not None:
                    kept.append(rows.numel())
                for row, i in zip(rows, chunk, strict=True):
                    out[i] = row.view_as(tensors[i])
        return out  # type: ignore[return-value]


def _total(counts: list[Tensor | int], device: torch.device) -> Tensor:
    """Σ counts as a 0-d int64 tensor on ``device`` (integers added on the host side)."""
    whole = sum(c for c in counts if isinstance(c, int))
    tensors = [c.to(device) for c in counts if isinstance(c, Tensor)]
    if not tensors:
        return torch.full((), whole, dtype=torch.int64, device=device)
    return torch.stack(tensors).sum() + whole


def zscore_mask(gradient: Tensor, percentile: float = 95.0, variant: Variant = "paper") -> Tensor:
    """The boolean mask m_ℓ of one tensor (True: kept), for inspection and tests.

    Under the official variant a 1-D tensor is not filtered and its mask is all True (its ε
    is the plain SAM share).
    """
    zfilter = ZScoreFilter(check_percentile(percentile), check_variant(variant))  # type: ignore[arg-type]
    if not zfilter.filters(gradient):
        return torch.ones_like(gradient, dtype=torch.bool)
    compute_dtype = torch.float64 if gradient.dtype == torch.float64 else torch.float32
    row = gradient.detach().reshape(1, -1).to(compute_dtype)
    keep = _KEEP_ROWS[variant](row, zfilter.percentile, [gradient.detach()])
    if keep is None:
        return torch.ones_like(gradient, dtype=torch.bool)
    return keep.view_as(gradient)
