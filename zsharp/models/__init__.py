"""Models by name: ``build_model("resnet20", num_classes=10, image_size=32)``.

Built-in architectures (``MODEL_NAMES``):

============  ==========================================================  ==================
name          architecture                                                options
============  ==========================================================  ==================
resnet20      CIFAR ResNet-20 (He et al. 2016), option-A shortcuts        ``shortcut``
resnet32      CIFAR ResNet-32                                             ``shortcut``
resnet56      CIFAR ResNet-56                                             ``shortcut``
resnet110     CIFAR ResNet-110                                            ``shortcut``
vgg16_bn      VGG-16 + BatchNorm, one linear head (Simonyan & Zisserman)  none
vgg19_bn      VGG-19 + BatchNorm, one linear head                         none
vit           the paper's small ViT (7 layers, 12 heads, hidden 384)      ``patch_size``,
                                                                          ``dropout``,
                                                                          ``reference_quirks``
wrn28_10      Wide ResNet 28-10, pre-activation (Zagoruyko & Komodakis)   ``dropout``
============  ==========================================================  ==================

``timm:NAME`` builds any timm model with random weights; its options go to
``timm.create_model``. Every built-in model ends in ``(batch, num_classes)`` logits, uses only
standard ``nn.BatchNorm2d`` for batch normalisation, and has no data-dependent Python control
flow in ``forward`` (``torch.compile`` and ``channels_last`` friendly).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from zsharp.models.resnet_cifar import CifarResNet, cifar_resnet
from zsharp.models.timm_models import build_timm_model
from zsharp.models.vgg import VGG, vgg16_bn, vgg19_bn
from zsharp.models.vit import ViT, default_patch_size
from zsharp.models.wrn import WideResNet, wrn28_10

__all__ = [
    "MODEL_NAMES",
    "TIMM_PREFIX",
    "VGG",
    "CifarResNet",
    "ViT",
    "WideResNet",
    "build_model",
    "default_patch_size",
    "num_parameters",
]

TIMM_PREFIX = "timm:"

# name -> (builder(num_classes, image_size, in_channels, **options), allowed option names)
_Builder = Callable[..., nn.Module]


def _resnet(depth: int) -> _Builder:
    def build(num_classes: int, image_size: int, in_channels: int, **options: Any) -> nn.Module:
        return cifar_resnet(depth, num_classes, in_channels, **options)

    return build


def _vgg(fn: Callable[[int, int, int], VGG]) -> _Builder:
    def build(num_classes: int, image_size: int, in_channels: int) -> nn.Module:
        return fn(num_classes, image_size, in_channels)

    return build


def _vit(num_classes: int, image_size: int, in_channels: int, **options: Any) -> nn.Module:
    return ViT(num_classes, image_size, in_channels, **options)


def _wrn(num_classes: int, image_size: int, in_channels: int, **options: Any) -> nn.Module:
    return wrn28_10(num_classes, in_channels, **options)


_REGISTRY: dict[str, tuple[_Builder, frozenset[str]]] = {
    "resnet20": (_resnet(20), frozenset({"shortcut"})),
    "resnet32": (_resnet(32), frozenset({"shortcut"})),
    "resnet56": (_resnet(56), frozenset({"shortcut"})),
    "resnet110": (_resnet(110), frozenset({"shortcut"})),
    "vgg16_bn": (_vgg(vgg16_bn), frozenset()),
    "vgg19_bn": (_vgg(vgg19_bn), frozenset()),
    "vit": (_vit, frozenset({"patch_size", "dropout", "reference_quirks"})),
    "wrn28_10": (_wrn, frozenset({"dropout"})),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_model(
    name: str, num_classes: int, image_size: int, in_channels: int = 3, **options: Any
) -> nn.Module:
    """Build model ``name`` for ``image_size``×``image_size`` inputs with ``in_channels``.

    Args:
        name: one of ``MODEL_NAMES``, or ``"timm:<timm model name>"``.
        num_classes: number of output logits.
        image_size: input height and width (square images).
        in_channels: input channels (1 for grey-scale digits).
        **options: model-specific options (see the module docstring).

    Raises:
        ValueError: unknown model name, an option the model does not take, or an invalid
            value (for example a ViT ``patch_size`` that does not divide ``image_size``).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX) :]
        if not timm_name:
            raise ValueError(f"model {name!r}: give a timm model name after {TIMM_PREFIX!r}")
        return build_timm_model(timm_name, num_classes, image_size, in_channels, **options)
    if name not in _REGISTRY:
        valid = ", ".join(MODEL_NAMES)
        raise ValueError(f"unknown model {name!r}; valid names: {valid}, or {TIMM_PREFIX}<name>")
    builder, allowed = _REGISTRY[name]
    unknown = sorted(set(options) - allowed)
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "none"
        raise ValueError(
            f"option {', '.join(map(repr, unknown))} does not apply to model {name!r} "
            f"(its options: {accepted})"
        )
    return builder(num_classes, image_size, in_channels, **options)


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
