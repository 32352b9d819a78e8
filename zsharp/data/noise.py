"""Noisy training labels: the label-noise benchmark of robust-training papers.

``symmetric`` (the setting of Foret et al. 2021, §3.3: "a fraction of the training set's
labels are randomly flipped"): exactly ⌊r·N⌉ training labels, chosen uniformly without
replacement, each replaced by a class drawn uniformly from the *other* C − 1 classes, so
the fraction of wrong labels is r exactly (the "symmetric flip" of Patrini et al. 2017,
with the count fixed rather than each label flipped by a coin).

``asymmetric`` (class-dependent, Patrini et al. 2017): every label of a source class of the
dataset's ``noise_map`` (CIFAR-10: truck → automobile, bird → airplane, deer → horse,
cat ↔ dog) becomes its target with probability r, independently.

The draws come from a generator of their own, seeded by (dataset, seed): the same labels
for every optimizer and model of a seed, whatever the training's own random draws, and the
test labels are never touched. :func:`labels_digest` names the label set a cell trained on.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

import numpy as np

KINDS = ("symmetric", "asymmetric")
# mixed into the generator's seed, so label noise draws apart from any other use of `seed`
_STREAM = 0x4C4E  # "LN"


def noise_generator(dataset: str, seed: int) -> np.random.Generator:
    """The generator of a (dataset, seed)'s label noise."""
    return np.random.default_rng(
        np.random.SeedSequence([seed, zlib.crc32(dataset.encode()), _STREAM])
    )


def noisy_labels(
    labels: np.ndarray,
    num_classes: int,
    rate: float,
    kind: str,
    *,
    dataset: str,
    seed: int,
    noise_map: Sequence[tuple[int, int]] = (),
) -> np.ndarray:
    """A noisy copy of the int64 ``labels`` (see the module docstring); rate 0 is a copy."""
    if kind not in KINDS:
        raise ValueError(f"label_noise_kind must be one of {list(KINDS)}, got {kind!r}")
    if not 0 <= rate < 1:
        raise ValueError(f"label_noise must be in [0, 1), got {rate!r}")
    labels = np.asarray(labels, dtype=np.int64)
    noisy = labels.copy()
    if rate == 0:
        return noisy
    rng = noise_generator(dataset, seed)
    if kind == "symmetric":
        count = round(rate * len(labels))
        chosen = rng.choice(len(labels), size=count, replace=False)
        # a uniform draw among the C − 1 other classes: shift past the true one
        other = rng.integers(0, num_classes - 1, size=count)
        noisy[chosen] = other + (other >= labels[chosen])
        return noisy
    if not noise_map:
        raise ValueError(f"label_noise_kind: asymmetric is not defined for {dataset}")
    flips = rng.random(len(labels)) < rate
    mapping = dict(noise_map)
    for source, target in mapping.items():
        noisy[(labels == source) & flips] = target
    return noisy


def labels_digest(labels: np.ndarray) -> str:
    """A short SHA-256 of a label array (int64, in order): the label set a cell trained on."""
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]
