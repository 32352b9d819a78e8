"""The model registry: every model ``build_model`` builds, as data (no PyTorch import).

One :class:`ModelInfo` per name: the builder (a lazy ``"module:function"`` path called as
``builder(num_classes, image_size, in_channels, **options)``), the options it takes as
:class:`~zsharp.optim.args.Arg` (type, default, range), and an optional shape check that
needs only the input size (a ViT's patch must divide the image). The workflow validates a
grid's models from this without building them; ``timm:NAME`` names any timm model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zsharp.optim.args import Arg, ArgError, check_args
from zsharp.optim.registry import load_object

TIMM_PREFIX = "timm:"

# options, image size → raise ArgError when the options cannot work at that size
ShapeCheck = Callable[[Mapping[str, Any], int], None]


@dataclass(frozen=True)
class ModelInfo:
    """What one model name means (see the module docstring)."""

    name: str
    builder: str
    options: tuple[Arg, ...] = ()
    description: str = ""
    shape_check: ShapeCheck | None = None

    def check_options(self, options: Mapping[str, Any], image_size: int) -> dict[str, Any]:
        """``options`` checked by name, range and against the input size; raise ArgError."""
        checked = check_args(self.options, options, f"model {self.name!r}")
        if self.shape_check is not None:
            self.shape_check(checked, image_size)
        return checked

    def load(self) -> Callable[..., Any]:
        return load_object(self.builder)


MODELS: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> ModelInfo:
    """Add ``info`` to the registry (a name may be registered once); return it."""
    if info.name in MODELS or info.name.startswith(TIMM_PREFIX):
        raise ValueError(f"model {info.name!r} is already registered or reserved")
    MODELS[info.name] = info
    return info


def timm_info(name: str) -> ModelInfo:
    """The entry for ``timm:NAME``: any timm model, its options passed to timm as they are."""
    return ModelInfo(name, "zsharp.models.timm_models:build_timm_model", description="timm")


def get_model(name: str) -> ModelInfo:
    """The registry entry of ``name`` (``timm:NAME`` included), or a ValueError."""
    if name in MODELS:
        return MODELS[name]
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return timm_info(name)
    raise ValueError(
        f"unknown model {name!r}; choose one of {', '.join(MODELS)}, or {TIMM_PREFIX}NAME"
    )


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


# --- the built-in models -------------------------------------------------------------------

SHORTCUT = Arg(
    "shortcut", "string", "A", "A: parameter-free padding shortcuts (He et al.), B: 1×1 "
    "projections", choices=("A", "B"),
)  # fmt: skip
INPUT_NORM = Arg(
    "input_norm", "string", "none", "normalise inside the model too, with this dataset's "
    "constants (the released code's ResNets and VGGs: cifar10)", choices=("none", "cifar10"),
)  # fmt: skip
FINAL_POOL = Arg(
    "final_pool", "string", "max", "max: five max-pools; avg: four, then the 2×2 map "
    "averaged (the released code's head)", choices=("max", "avg"),
)  # fmt: skip
DROPOUT = Arg("dropout", "number", 0.0, "dropout probability", minimum=0, maximum=1,
              exclusive_maximum=True)  # fmt: skip
PATCH_SIZE = Arg("patch_size", "integer", None, "patch side in pixels (default: the largest "
                 "divisor of the image size giving at least 8×8 patches)", minimum=1)  # fmt: skip
REFERENCE_QUIRKS = Arg("reference_quirks", "boolean", True, "the reference code's attention "
                       "scale 1/√hidden and extra GELU")  # fmt: skip


# the ViT's encoder shape; defaults are the paper's (7 layers, 12 heads, hidden 384)
VIT_SHAPE = (
    Arg("depth", "integer", 7, "encoder layers", minimum=1),
    Arg("heads", "integer", 12, "attention heads (must divide hidden)", minimum=1),
    Arg("hidden", "integer", 384, "token width", minimum=1),
    Arg("mlp_hidden", "integer", 384, "the MLP's inner width", minimum=1),
)


def _patch_divides(options: Mapping[str, Any], image_size: int) -> None:
    patch = options.get("patch_size")
    if patch is not None and image_size % patch:
        raise ArgError("patch_size", f"{patch} must divide the image size {image_size}")
    heads, hidden = options.get("heads", 12), options.get("hidden", 384)
    if hidden % heads:
        raise ArgError("heads", f"{heads} must divide hidden ({hidden})")


for _info in (
    *(
        ModelInfo(f"resnet{d}", f"zsharp.models.resnet_cifar:resnet{d}", (SHORTCUT, INPUT_NORM),
                  f"CIFAR ResNet-{d} (He et al. 2016)")
        for d in (20, 32, 56, 110)
    ),
    ModelInfo("vgg16_bn", "zsharp.models.vgg:vgg16_bn", (FINAL_POOL, INPUT_NORM),
              "VGG-16 + BatchNorm, one linear head"),
    ModelInfo("vgg19_bn", "zsharp.models.vgg:vgg19_bn", (FINAL_POOL, INPUT_NORM),
              "VGG-19 + BatchNorm, one linear head"),
    ModelInfo("vit", "zsharp.models.vit:vit", (PATCH_SIZE, DROPOUT, REFERENCE_QUIRKS, *VIT_SHAPE),
              "the paper's small ViT (7 layers, 12 heads, hidden 384)", _patch_divides),
    ModelInfo("wrn28_10", "zsharp.models.wrn:wrn28_10", (DROPOUT,),
              "Wide ResNet 28-10, pre-activation"),
):  # fmt: skip
    register_model(_info)
