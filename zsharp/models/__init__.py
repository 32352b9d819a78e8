"""Models by name: ``build_model("resnet20", num_classes=10, image_size=32)``.

The names, their options and what each is live in one place, the registry
(:mod:`zsharp.models.registry`, readable without PyTorch); the README's model table is
generated from it. ``timm:NAME`` builds any timm model with random weights; its options go
to ``timm.create_model``. Every built-in model ends in ``(batch, num_classes)`` logits, uses
only standard ``nn.BatchNorm2d`` for batch normalisation, and has no data-dependent Python
control flow in ``forward`` (``torch.compile`` and ``channels_last`` friendly).
"""

from __future__ import annotations

import importlib
from typing import Any

from zsharp.models.registry import (
    MODELS,
    TIMM_PREFIX,
    ModelInfo,
    get_model,
    register_model,
)
from zsharp.optim.args import ArgError

__all__ = [
    "MODELS",
    "MODEL_NAMES",
    "TIMM_PREFIX",
    "VGG",
    "CifarResNet",
    "ModelInfo",
    "ViT",
    "WideResNet",
    "build_model",
    "default_patch_size",
    "get_model",
    "num_parameters",
    "register_model",
]

_LAZY = {
    "VGG": "zsharp.models.vgg",
    "CifarResNet": "zsharp.models.resnet_cifar",
    "ViT": "zsharp.models.vit",
    "default_patch_size": "zsharp.models.vit",
    "WideResNet": "zsharp.models.wrn",
}


def __getattr__(name: str) -> Any:
    """Import the PyTorch parts on first use (PEP 562)."""
    if name == "MODEL_NAMES":
        return tuple(MODELS)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zsharp.models' has no attribute {name!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def build_model(
    name: str, num_classes: int, image_size: int, in_channels: int = 3, **options: Any
) -> Any:
    """Build model ``name`` for ``image_size``×``image_size`` inputs with ``in_channels``.

    Args:
        name: a key of ``MODELS``, or ``"timm:<timm model name>"``.
        num_classes: number of output logits.
        image_size: input height and width (square images).
        in_channels: input channels (1 for grey-scale digits).
        **options: the model's options (its registry entry lists them).

    Raises:
        ValueError: unknown model name, an option the model does not take, or an invalid
            value (for example a ViT ``patch_size`` that does not divide ``image_size``).
    """
    _positive("num_classes", num_classes)
    _positive("image_size", image_size)
    _positive("in_channels", in_channels)
    info = get_model(name)
    if name.startswith(TIMM_PREFIX):
        return info.load()(
            name[len(TIMM_PREFIX) :], num_classes, image_size, in_channels, **options
        )
    try:
        checked = info.check_options(options, image_size)
    except ArgError as error:
        raise ValueError(f"option {error.key!r} of model {name!r}: {error.why}") from None
    return info.load()(num_classes, image_size, in_channels, **checked)


def num_parameters(model: Any, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
