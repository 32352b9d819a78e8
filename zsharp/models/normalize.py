"""Input normalisation inside a model, as the released ZSharp code's ResNets and VGGs do.

The released code's CIFAR ResNets and VGGs start with advertorch's
``NormalizeByChannelMeanStd`` with CIFAR-10's constants, on top of the data pipeline's own
normalisation (on every dataset, CIFAR-100 and SVHN included). ``input_norm: cifar10``
reproduces that; the constants are the dataset registry's (one place for them).
"""

from __future__ import annotations

import torch
from torch import nn

from zsharp.data.registry import get_spec


class NormalizedInput(nn.Module):
    """``model((x − mean) / std)`` with per-channel constants (not trained, not saved)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        shape = (1, len(mean), 1, 1)
        # float64, so the constants are exact in a float64 model; cast to the input's dtype
        for name, values in (("mean", mean), ("std", std)):
            tensor = torch.tensor(values, dtype=torch.float64).view(shape)
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def with_input_norm(model: nn.Module, input_norm: str) -> nn.Module:
    """``model`` itself for ``"none"``, else wrapped to normalise with that dataset's
    registry constants."""
    if input_norm == "none":
        return model
    spec = get_spec(input_norm)
    return NormalizedInput(model, spec.mean, spec.std)
