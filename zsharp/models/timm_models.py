"""Any timm model, by name, without pretrained weights.

R. Wightman, "PyTorch Image Models" (timm), https://github.com/huggingface/pytorch-image-models.

``build_timm_model("vit_tiny_patch16_224", ...)`` calls ``timm.create_model`` with
``pretrained=False`` (nothing is downloaded), the requested number of classes and input
channels, and ``img_size=image_size`` for models whose constructor accepts it (the ViT
family and other models with fixed-size position embeddings). Whether it is accepted is found
by trying: a ``TypeError`` that names ``img_size`` means the constructor does not take it, and
the model is built again without it.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

_UNEXPECTED_KWARG = re.compile(r"unexpected keyword argument '([^']+)'")


def build_timm_model(
    name: str, num_classes: int, image_size: int, in_channels: int = 3, **options: Any
) -> nn.Module:
    """Create timm model ``name`` with random weights.

    ``options`` go to ``timm.create_model`` (for example ``drop_rate`` or ``patch_size``).
    An option the model's constructor does not accept raises ``ValueError`` naming it, and an
    unknown model name raises ``ValueError`` too.
    """
    import timm  # imported here: timm is slow to import and only this builder needs it

    if "pretrained" in options:
        raise ValueError("option 'pretrained' is not supported: timm models are built untrained")
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels, **options}
    try_img_size = "img_size" not in options
    while True:
        extra = {"img_size": image_size} if try_img_size else {}
        try:
            return timm.create_model(name, pretrained=False, **kwargs, **extra)
        except TypeError as err:
            match = _UNEXPECTED_KWARG.search(str(err))
            if match is None:
                raise
            if try_img_size and match.group(1) == "img_size":
                try_img_size = False
                continue
            raise ValueError(
                f"option {match.group(1)!r} does not apply to timm model {name!r}: {err}"
            ) from err
