"""A plugin defined only here: two toy SAM variants, a toy model and a toy dataset.

Importing it registers them all (``ZSHARP_PLUGINS=tests.toy_plugin`` makes the command line
and the workflow import it); nothing else in the repository names them. The test of the
registry redesign runs them through ``create``, the config validation, ``zsharp train`` and
a ``snakemake -n``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zsharp.data.registry import DatasetSpec, register_dataset
from zsharp.models.registry import ModelInfo, register_model
from zsharp.optim.args import Arg
from zsharp.optim.registry import SAM_ARGS, OptimizerInfo, register_optimizer
from zsharp.optim.sam import SAM


class HalfSAM(SAM):
    """SAM whose ascent direction keeps only the first entries of each tensor: a stand-in
    for a new variant (it overrides the direction hook ``_direction``, as Friendly-SAM)."""

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, share: float = 0.5,
                 adaptive: bool = False, eta: float = 0.0, **base_kwargs: Any) -> None:  # fmt: skip
        self.share = share
        super().__init__(params, base_optimizer, rho, adaptive, eta, **base_kwargs)

    @torch.no_grad()
    def _direction(self, group: Any) -> list[torch.Tensor]:
        directions = []
        for g in group.grads:
            flat = g.reshape(-1).clone()
            flat[int(self.share * flat.numel()) :] = 0
            directions.append(flat.view_as(g))
        return directions


class OrthoSAM(SAM):
    """SAM whose descent gradient loses part of the ascent gradient's component orthogonal
    to it, tensor by tensor: a stand-in for a variant that changes the descent (GSAM's rule
    on each tensor instead of the whole model). It overrides the descent hook only:

        d_ℓ = g'_ℓ − α · (g_ℓ − ⟨g_ℓ, g'_ℓ⟩ / (‖g'_ℓ‖² + 1e-12) · g'_ℓ)

    with g = ∇L(w) (kept by ``keeps_ascent_gradient``) and g' = ∇L(w + ε).
    """

    keeps_ascent_gradient = True

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, alpha: float = 0.5,
                 adaptive: bool = False, eta: float = 0.0, **base_kwargs: Any) -> None:  # fmt: skip
        self.alpha = alpha
        super().__init__(params, base_optimizer, rho, adaptive, eta, **base_kwargs)

    @torch.no_grad()
    def _descent(self, groups: Any, sharpness_aware: bool) -> None:
        if not sharpness_aware:
            return
        for group in groups:
            for d, g in zip(group.grads, group.ascent_grads, strict=True):
                along = (g * d).sum() / ((d * d).sum() + 1e-12)
                d.sub_(self.alpha * (g - along * d))


def toy_mlp(num_classes: int, image_size: int, in_channels: int = 3, width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_channels * image_size**2, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )  # fmt: skip


def prepare_toy(files: Mapping[str, Path], stage: Any) -> dict[str, Any]:
    """40 train and 20 test 1×4×4 images of three classes, drawn with a fixed seed."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        y = np.arange(n) % 3
        x = (rng.integers(0, 64, (n, 1, 4, 4)) + 60 * y[:, None, None, None]).astype(np.uint8)
        stage.save(split, x, y)
    return {"num_classes": 3, "class_names": ["a", "b", "c"]}


register_optimizer(OptimizerInfo(
    "half-sam", "tests.toy_plugin:HalfSAM",
    (*SAM_ARGS, Arg("share", "number", 0.5, "share of entries kept", minimum=0, maximum=1)),
    description="toy SAM variant",
))  # fmt: skip
register_optimizer(OptimizerInfo(
    "ortho-sam", "tests.toy_plugin:OrthoSAM",
    (*SAM_ARGS, Arg("alpha", "number", 0.5, "share of g⊥ removed", minimum=0)),
    description="toy SAM variant with its own descent",
))  # fmt: skip
register_model(ModelInfo(
    "toy-mlp", "tests.toy_plugin:toy_mlp",
    (Arg("width", "integer", 8, "hidden units", minimum=1),), "toy MLP",
))  # fmt: skip
register_dataset(DatasetSpec(
    name="toy-blobs", num_classes=3, image_size=4, channels=1, mean=(0.5,), std=(0.3,),
    prepare="tests.toy_plugin:prepare_toy",
    defaults={"epochs": 2, "batch_size": 8, "lr": 0.05, "flip": False, "crop_padding": 0},
))  # fmt: skip
