"""VGG-16-BN and VGG-19-BN for small images.

K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015, arXiv:1409.1556 (configurations D and E), with batch normalisation
after every convolution (S. Ioffe, C. Szegedy, ICML 2015, arXiv:1502.03167) as in
torchvision's ``vgg16_bn`` / ``vgg19_bn``.

CIFAR variant, as in common CIFAR code: the three-layer 4096-wide classifier is replaced by a
single ``Linear(512, num_classes)`` after global average pooling. On 32×32 inputs the five
max-pools leave a 1×1 map, so the pooling is a no-op there and the network equals the usual
CIFAR VGG; on 64×64 inputs (Tiny-ImageNet) it averages the final 2×2 map.

Small images: a 2×2 max-pool on a 1×1 map would fail, so at build time the map size is
tracked from ``image_size`` and every max-pool that would come *after* the map has reached
1×1 is left out (for 8×8 digits: pools after blocks 1-3 are kept, 8 → 4 → 2 → 1, and those
after blocks 4 and 5 are skipped). Pools use floor division, like ``nn.MaxPool2d(2, 2)``.
"""

from __future__ import annotations

import torch
from torch import nn

from zsharp.models.normalize import with_input_norm

# torchvision's VGG configurations; "M" is a 2×2 max-pool.
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"),
}  # fmt: skip


def kept_pools(config: tuple[int | str, ...], image_size: int) -> list[bool]:
    """For each "M" in ``config``, whether it is kept for an ``image_size`` input.

    A pool is skipped once the feature map is already 1×1 (it could not shrink further).
    """
    size = image_size
    kept = []
    for v in config:
        if v != "M":
            continue
        if size > 1:
            kept.append(True)
            size //= 2
        else:
            kept.append(False)
    return kept


class VGG(nn.Module):
    """VGG with BatchNorm and a single linear head (CIFAR variant).

    Args:
        config: a key of ``VGG_CONFIGS`` ("D" = VGG-16, "E" = VGG-19).
        num_classes: size of the output layer.
        image_size: input height/width, used to decide which max-pools to keep.
        in_channels: image channels.
        final_pool: ``"max"``: five max-pools (a 1×1 map on 32×32 inputs); ``"avg"``: the
            released code's head, four max-pools, then the remaining (2×2) map averaged.
    """

    def __init__(
        self,
        config: str,
        num_classes: int,
        image_size: int,
        in_channels: int = 3,
        final_pool: str = "max",
    ):
        super().__init__()
        cfg = VGG_CONFIGS[config]
        if final_pool == "avg":  # the released code: no fifth max-pool, average the map
            cfg = cfg[:-1]
        keep = iter(kept_pools(cfg, image_size))
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                if next(keep):
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            assert isinstance(v, int)
            layers += [
                nn.Conv2d(channels, v, kernel_size=3, padding=1),
                nn.BatchNorm2d(v),
                nn.ReLU(inplace=True),
            ]
            channels = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        # torchvision's VGG initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.features(x))
        return self.classifier(torch.flatten(out, 1))


def _builder(config: str, depth: int):  # type: ignore[no-untyped-def]
    def build(
        num_classes: int,
        image_size: int,
        in_channels: int = 3,
        final_pool: str = "max",
        input_norm: str = "none",
    ) -> nn.Module:
        vgg = VGG(config, num_classes, image_size, in_channels, final_pool)
        return with_input_norm(vgg, input_norm)

    build.__name__ = build.__qualname__ = f"vgg{depth}_bn"
    build.__doc__ = (
        f"VGG-{depth} with BatchNorm (configuration {config}, Simonyan & Zisserman 2015), "
        "CIFAR head; the registry's builder."
    )
    return build


vgg16_bn = _builder("D", 16)
vgg19_bn = _builder("E", 19)
