"""Tests for zsharp.models: architecture sizes, shapes, options and error messages."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from zsharp.models import MODEL_NAMES, ViT, build_model, default_patch_size, num_parameters

BUILTINS = (
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "vgg16_bn",
    "vgg19_bn",
    "vit",
    "wrn28_10",
)

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M")  # fmt: skip


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Run these tiny-batch tests on one intra-op thread.

    With batch 2 a second thread gains little, and when the 2 cores are shared with other
    jobs OpenMP's spinning barriers make 2-thread runs up to 20× slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Parameter counts, computed from each paper's architecture description (not from the code).


def conv_bn(c_in: int, c_out: int, k: int = 3, bias: bool = False) -> int:
    """Weights of a k×k conv (optionally with bias) followed by BatchNorm (γ, β)."""
    return k * k * c_in * c_out + (c_out if bias else 0) + 2 * c_out


def cifar_resnet_params(depth: int, num_classes: int = 10, in_ch: int = 3, option: str = "A"):
    """He et al. 2016 §4.2: 16-channel stem, 3 stages × n basic blocks, GAP, FC."""
    n = (depth - 2) // 6
    total = conv_bn(in_ch, 16)
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv_bn(c_in, width) + conv_bn(width, width)
            if option == "B" and c_in != width:
                total += conv_bn(c_in, width, k=1)  # projection shortcut
            c_in = width
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize(
    ("depth", "expected_a", "expected_b"),
    [
        (20, 269_722, 272_474),
        (32, 464_154, 466_906),
        (56, 853_018, 855_770),
        (110, 1_727_962, 1_730_714),
    ],
)
def test_cifar_resnet_parameter_counts(depth: int, expected_a: int, expected_b: int) -> None:
    assert cifar_resnet_params(depth, option="A") == expected_a
    assert cifar_resnet_params(depth, option="B") == expected_b
    model_a = build_model(f"resnet{depth}", num_classes=10, image_size=32)
    assert num_parameters(model_a) == expected_a
    model_b = build_model(f"resnet{depth}", num_classes=10, image_size=32, shortcut="B")
    assert num_parameters(model_b) == expected_b
    # The paper's table (Table 6): 0.27M / 0.46M / 0.85M / 1.7M.
    paper = {20: 0.27, 32: 0.46, 56: 0.85, 110: 1.7}[depth]
    assert round(expected_a / 1e6, 2 if depth < 110 else 1) == paper


def test_cifar_resnet_other_classes_and_channels() -> None:
    model = build_model("resnet56", num_classes=100, image_size=32, in_channels=1)
    assert num_parameters(model) == cifar_resnet_params(56, num_classes=100, in_ch=1)


def test_cifar_resnet_structure() -> None:
    model = build_model("resnet56", 10, 32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 56  # 6n + 2 weighted layers, no projection convs
    assert all(m.kernel_size == (3, 3) for m in convs)


def test_option_a_shortcut_zero_pads_subsampled_input() -> None:
    model = build_model("resnet20", 10, 32)
    block = model.layer2[0]  # 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert list(block.shortcut.parameters()) == []
    nonzero = [c for c in range(32) if out[:, c].abs().sum() > 0]
    assert len(nonzero) == 16
    torch.testing.assert_close(out[:, nonzero], x[:, :, ::2, ::2])


def vgg_params(config: tuple, num_classes: int = 10, in_ch: int = 3) -> int:
    total, c_in = 0, in_ch
    for v in config:
        if v != "M":
            total += conv_bn(c_in, v, bias=True)
            c_in = v
    return total + 512 * num_classes + num_classes


def wrn_params(depth: int = 28, k: int = 10, num_classes: int = 10, in_ch: int = 3) -> int:
    """Zagoruyko & Komodakis 2016: pre-activation blocks, 1×1 conv where the shape changes."""
    n = (depth - 4) // 6
    total = 9 * in_ch * 16
    c_in = 16
    for width in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * c_in + 9 * c_in * width + 2 * width + 9 * width * width
            if c_in != width:
                total += c_in * width
            c_in = width
    return total + 2 * c_in + c_in * num_classes + num_classes


def vit_params(tokens: int, patch_dim: int, num_classes: int = 10) -> int:
    hidden, mlp, depth = 384, 384, 7
    linear = hidden * hidden + hidden
    layer = 2 * 2 * hidden + 4 * linear + (hidden * mlp + mlp) + (mlp * hidden + hidden)
    embed = patch_dim * hidden + hidden + hidden + tokens * hidden  # patch proj, CLS, positions
    return embed + depth * layer + 2 * hidden + hidden * num_classes + num_classes


def test_other_parameter_counts() -> None:
    assert num_parameters(build_model("vgg16_bn", 10, 32)) == vgg_params(VGG16) == 14_728_266
    assert num_parameters(build_model("vgg19_bn", 10, 32)) == vgg_params(VGG19) == 20_040_522
    assert num_parameters(build_model("vgg16_bn", 100, 8, 1)) == vgg_params(VGG16, 100, 1)
    # ViT, 32×32, patch 4: 64 patches + CLS; patch vector 4·4·3 = 48 (reference: 6.3M).
    assert num_parameters(build_model("vit", 10, 32)) == vit_params(65, 48) == 6_268_810
    assert num_parameters(build_model("vit", 200, 64)) == vit_params(65, 192, 200)
    assert num_parameters(build_model("vit", 10, 8, 1)) == vit_params(17, 4)


def test_wrn28_10_parameters_and_forward() -> None:
    model = build_model("wrn28_10", 10, 32)
    assert num_parameters(model) == wrn_params() == 36_479_194
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model = build_model("wrn28_10", 10, 32, dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules()) == 12


# ---------------------------------------------------------------------------------------------
# Shapes


def test_model_names() -> None:
    assert MODEL_NAMES == BUILTINS


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_size", [8, 32, 64])
@pytest.mark.parametrize("name", [n for n in BUILTINS if n != "wrn28_10"])
def test_forward_shape(name: str, image_size: int, in_channels: int) -> None:
    model = build_model(name, num_classes=7, image_size=image_size, in_channels=in_channels)
    x = torch.randn(2, in_channels, image_size, image_size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    if image_size == 8:  # batch of one in eval mode (BatchNorm uses running statistics)
        model.eval()
        with torch.no_grad():
            assert model(x[:1]).shape == (1, 7)


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "vit"])
def test_channels_last_matches_and_gradients_reach_every_parameter(name: str) -> None:
    model = build_model(name, num_classes=5, image_size=16).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    model.train()
    model(x).square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", BUILTINS)
def test_batchnorm_layers_are_standard(name: str) -> None:
    model = build_model(name, 10, 32)
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    bns = [m for m in norms if isinstance(m, _BatchNorm)]
    assert all(type(m) is nn.BatchNorm2d for m in bns)
    if name == "vit":
        assert bns == [] and all(type(m) is nn.LayerNorm for m in norms)
    else:
        assert bns and len(bns) == len(norms)


# ---------------------------------------------------------------------------------------------
# VGG pool skipping


def _feature_map_sizes(model: nn.Module, image_size: int) -> list[tuple[str, int]]:
    sizes: list[tuple[str, int]] = []
    hooks = [
        m.register_forward_hook(
            lambda mod, _inp, out: sizes.append((type(mod).__name__, out.shape[-1]))
        )
        for m in model.features
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d))
    ]
    model(torch.randn(2, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize(
    ("image_size", "pools", "final"), [(8, 3, 1), (16, 4, 1), (32, 5, 1), (64, 5, 2), (28, 4, 1)]
)
@pytest.mark.parametrize("name", ["vgg16_bn", "vgg19_bn"])
def test_vgg_skips_pools_once_map_is_1x1(name: str, image_size: int, pools: int, final: int):
    model = build_model(name, 10, image_size)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == (13 if "16" in name else 16)
    sizes = _feature_map_sizes(model, image_size)
    assert min(s for _, s in sizes) == final == sizes[-1][1]
    # Pools are kept exactly while the incoming map is larger than 1×1.
    size = image_size
    for kind, s in sizes:
        if kind == "MaxPool2d":
            assert size > 1
            size //= 2
        assert s == size


def test_vgg_8x8_layout() -> None:
    sizes = _feature_map_sizes(build_model("vgg16_bn", 10, 8), 8)
    # blocks 1-3 end in a pool (8 → 4 → 2 → 1); blocks 4 and 5 run at 1×1 without pools.
    assert [s for k, s in sizes if k == "MaxPool2d"] == [4, 2, 1]
    assert [s for k, s in sizes if k == "Conv2d"] == [8, 8, 4, 4, 2, 2, 2] + [1] * 6


# ---------------------------------------------------------------------------------------------
# ViT


def _token_count(model: ViT, image_size: int, in_channels: int = 3) -> int:
    seen: list[int] = []
    hook = model.encoder[0].register_forward_hook(
        lambda _m, inp, _out: seen.append(inp[0].shape[1])
    )
    model(torch.randn(1, in_channels, image_size, image_size))
    hook.remove()
    return seen[0]


@pytest.mark.parametrize(
    ("image_size", "patch_size", "expected_patch"),
    [(32, None, 4), (64, None, 8), (8, None, 2), (32, 8, 8), (32, 16, 16), (28, None, 2),
     (16, None, 2), (224, None, 28), (12, 3, 3)],
)  # fmt: skip
def test_vit_patch_count(image_size: int, patch_size: int | None, expected_patch: int) -> None:
    options = {} if patch_size is None else {"patch_size": patch_size}
    model = build_model("vit", 10, image_size, **options)
    assert model.patch_size == expected_patch
    if patch_size is None:
        assert default_patch_size(image_size) == expected_patch
    assert _token_count(model, image_size) == (image_size // expected_patch) ** 2 + 1
    assert model.pos_embed.shape == (1, (image_size // expected_patch) ** 2 + 1, 384)


def test_vit_shape_matches_paper() -> None:
    model = build_model("vit", 10, 32)
    assert len(model.encoder) == 7
    layer = model.encoder[0]
    assert layer.attn.heads == 12 and layer.attn.q.weight.shape == (384, 384)
    assert layer.mlp[0].weight.shape == (384, 384)  # MLP hidden 384
    assert model.cls_token.shape == (1, 1, 384)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    dropped = build_model("vit", 10, 32, dropout=0.1)
    assert {m.p for m in dropped.modules() if isinstance(m, nn.Dropout)} == {0.1}


def _reference_layer(layer: nn.Module, x: torch.Tensor, quirks: bool) -> torch.Tensor:
    """omihub777/ViT-CIFAR's TransformerEncoder written out with einsum (dropout 0)."""
    attn, heads = layer.attn, 12
    b, n, f = x.shape
    h = layer.norm1(x)
    q, k, v = (
        lin(h).view(b, n, heads, f // heads).transpose(1, 2) for lin in (attn.q, attn.k, attn.v)
    )
    scale = math.sqrt(f) if quirks else math.sqrt(f // heads)
    score = F.softmax(torch.einsum("bhif,bhjf->bhij", q, k) / scale, dim=-1)
    out = x + attn.o(torch.einsum("bhij,bhjf->bihf", score, v).flatten(2))
    lin1, lin2 = layer.mlp[0], layer.mlp[3]
    mlp = lin2(F.gelu(lin1(layer.norm2(out))))
    return out + (F.gelu(mlp) if quirks else mlp)


@pytest.mark.parametrize("quirks", [True, False])
def test_vit_encoder_layer_matches_reference(quirks: bool) -> None:
    model = build_model("vit", 10, 32, reference_quirks=quirks).eval()
    x = torch.randn(2, 65, 384)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encoder[0](x), _reference_layer(model.encoder[0], x, quirks)
        )


def test_vit_patch_embedding_is_per_patch() -> None:
    model = build_model("vit", 10, 8, 1).eval()
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2:4, 4:6] = torch.randn(2, 2)  # patch (row 1, col 2) of the 4×4 grid of 2×2 patches
    with torch.no_grad():
        tokens = model.patch_embed(x).flatten(2).transpose(1, 2)[0]
    bias = model.patch_embed.bias
    changed = [i for i in range(16) if not torch.allclose(tokens[i], bias)]
    assert changed == [1 * 4 + 2]


@pytest.mark.parametrize("patch_size", [5, 3, 0, -4, 64, 2.0])
def test_vit_bad_patch_size(patch_size: object) -> None:
    with pytest.raises(ValueError, match="patch_size"):
        build_model("vit", 10, 32, patch_size=patch_size)


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet18_cifar") as info:
        build_model("resnet18_cifar", 10, 32)
    for name in BUILTINS:
        assert name in str(info.value)
    assert "timm:" in str(info.value)


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("resnet20", "dropout"),
        ("vgg16_bn", "patch_size"),
        ("vit", "shortcut"),
        ("wrn28_10", "width"),
    ],
)
def test_unknown_option(name: str, option: str) -> None:
    with pytest.raises(ValueError, match=f"'{option}'.*'{name}'"):
        build_model(name, 10, 32, **{option: 1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"image_size": 0}, "image_size"),
        ({"in_channels": 0}, "in_channels"),
        ({"shortcut": "C"}, "shortcut"),
    ],
)
def test_bad_values(kwargs: dict, match: str) -> None:
    args = {"name": "resnet20", "num_classes": 10, "image_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**args)


# ---------------------------------------------------------------------------------------------
# timm


def test_timm_cnn_without_img_size() -> None:
    model = build_model("timm:resnet10t", num_classes=3, image_size=32, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert model.conv1[0].in_channels == 1  # in_chans reached the model
    assert any(isinstance(m, _BatchNorm) for m in model.modules())


def test_timm_vit_gets_img_size_and_options() -> None:
    model = build_model("timm:vit_tiny_patch16_224", 4, 32, drop_rate=0.2)
    assert model.pos_embed.shape[1] == (32 // 16) ** 2 + 1  # img_size=32 reached the model
    assert model.head.out_features == 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    small = build_model("timm:vit_tiny_patch16_224", 4, 32, patch_size=8)
    assert small.pos_embed.shape[1] == (32 // 8) ** 2 + 1


def test_timm_errors() -> None:
    with pytest.raises(ValueError, match="no_such_model_xyz"):
        build_model("timm:no_such_model_xyz", 10, 32)
    with pytest.raises(ValueError, match="'bogus_option'"):
        build_model("timm:resnet10t", 10, 32, bogus_option=1)
    with pytest.raises(ValueError, match="'bogus_option'"):
        build_model("timm:vit_tiny_patch16_224", 10, 32, bogus_option=1)
    with pytest.raises(ValueError, match="pretrained"):
        build_model("timm:resnet10t", 10, 32, pretrained=True)


# ---------------------------------------------------------------------------------------------
# torch.compile (slow: Inductor compiles C++ on the CPU)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "vit"])
def test_torch_compile_fullgraph_channels_last(name: str) -> None:
    model = build_model(name, 10, 8).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [*BUILTINS, "timm:resnet10t"])
def test_builds_on_meta_device(name: str) -> None:
    """The cell config validates model_args by building on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(name, 10, 32)
    assert all(p.device.type == "meta" for p in model.parameters())
