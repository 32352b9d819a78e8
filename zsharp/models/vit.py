"""The small Vision Transformer used by the ZSharp paper.

A. Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021, arXiv:2010.11929, in the small CIFAR configuration of
omihub777/ViT-CIFAR, on which the ZSharp code (Yun, arXiv:2505.02369) builds: 7 pre-LayerNorm
encoder layers, 12 heads, hidden size 384, MLP hidden size 384, GELU, a learnable CLS token
and learnable position embeddings, a LayerNorm + Linear head on the CLS token, dropout 0.

Patch size. ``patch_size`` is in pixels. The reference's ``--patch 8`` flag counts patches
*per side* (8×8 patches of 4×4 pixels on 32×32 images, 8×8 pixels on 64×64), so the default
here is the largest patch size that still gives an 8×8 grid or finer: 4 for 32×32 (65
tokens), 8 for 64×64. Images smaller than 16 pixels get a grid of at least 4×4 instead (2 for
8×8 digits, 17 tokens). A ``patch_size`` that does not divide ``image_size`` is an error.

Layout choices that matter for layer-wise methods such as ZSharp, which filter each
parameter tensor separately, follow the reference: separate q, k, v and output projections
(not one fused qkv tensor), a CLS token of shape (1, 1, hidden) and position embeddings of
shape (1, tokens, hidden), both drawn from N(0, 1); Linear layers keep PyTorch's default
initialisation. The patch embedding is a Conv2d with kernel = stride = patch size, which is
the reference's Linear on flattened patches with its inputs reordered (same number of
weights, same initial distribution).

``reference_quirks=True`` (default) also keeps two details of the reference code: attention
logits are divided by sqrt(hidden) = sqrt(384) rather than sqrt(head dim) = sqrt(32), and the
MLP applies GELU after its second Linear as well. ``reference_quirks=False`` gives the
standard ViT block (scale 1/sqrt(head dim), no activation after the MLP output).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def default_patch_size(image_size: int) -> int:
    """Largest divisor of ``image_size`` that gives at least 8×8 patches (4×4 below 16 px)."""
    min_grid = 8 if image_size >= 16 else 4
    for p in range(image_size // min_grid, 0, -1):
        if image_size % p == 0:
            return p
    return 1


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections."""

    def __init__(self, hidden: int, heads: int, dropout: float, scale: float) -> None:
        super().__init__()
        if hidden % heads != 0:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = scale
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)  # (b, heads, n, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).flatten(2)  # (b, n, hidden)
        return self.dropout(self.o(out))


class TransformerEncoderLayer(nn.Module):
    """Pre-LayerNorm encoder layer: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self,
        hidden: int,
        mlp_hidden: int,
        heads: int,
        dropout: float,
        reference_quirks: bool,
    ) -> None:
        super().__init__()
        head_dim = hidden // heads
        scale = 1.0 / math.sqrt(hidden if reference_quirks else head_dim)
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = MultiHeadSelfAttention(hidden, heads, dropout, scale)
        self.norm2 = nn.LayerNorm(hidden)
        mlp: list[nn.Module] = [
            nn.Linear(hidden, mlp_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_hidden, hidden),
        ]
        if reference_quirks:
            mlp.append(nn.GELU())
        mlp.append(nn.Dropout(dropout))
        self.mlp = nn.Sequential(*mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small ViT for CIFAR-sized images (Dosovitskiy et al. 2021; omihub777/ViT-CIFAR).

    Args:
        num_classes: size of the output layer.
        image_size: input height/width (square images).
        in_channels: image channels.
        patch_size: patch side in pixels; must divide ``image_size``. ``None``: see
            :func:`default_patch_size`.
        dropout: dropout after the attention output and inside the MLP.
        depth, heads, hidden, mlp_hidden: the encoder's shape (paper: 7, 12, 384, 384).
        reference_quirks: keep the reference code's attention scale and extra GELU.
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        in_channels: int = 3,
        patch_size: int | None = None,
        dropout: float = 0.0,
        depth: int = 7,
        heads: int = 12,
        hidden: int = 384,
        mlp_hidden: int = 384,
        reference_quirks: bool = True,
    ) -> None:
        super().__init__()
        if patch_size is None:
            patch_size = default_patch_size(image_size)
        if (
            isinstance(patch_size, bool)
            or not isinstance(patch_size, int)
            or patch_size < 1
            or image_size % patch_size != 0
        ):
            raise ValueError(
                f"patch_size={patch_size!r} must be a positive integer that divides "
                f"image_size={image_size}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches + 1, hidden))
        self.encoder = nn.Sequential(
            *(
                TransformerEncoderLayer(hidden, mlp_hidden, heads, dropout, reference_quirks)
                for _ in range(depth)
            )
        )
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, patches, hidden)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        tokens = self.encoder(tokens)
        return self.head(tokens[:, 0])


def vit(
    num_classes: int,
    image_size: int,
    in_channels: int = 3,
    patch_size: int | None = None,
    dropout: float = 0.0,
    reference_quirks: bool = True,
    depth: int = 7,
    heads: int = 12,
    hidden: int = 384,
    mlp_hidden: int = 384,
) -> ViT:
    """The paper's ViT (its encoder's shape by default) with the registry's options."""
    return ViT(
        num_classes,
        image_size,
        in_channels,
        patch_size=patch_size,
        dropout=dropout,
        depth=depth,
        heads=heads,
        hidden=hidden,
        mlp_hidden=mlp_hidden,
        reference_quirks=reference_quirks,
    )
