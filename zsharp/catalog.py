"""The names the configs may use, as plain data: importable without PyTorch.

The Snakemake workflow validates a whole grid with these (a dry run of the paper's 360
cells stays fast), and every training job validates its own cell in depth by building the
optimizer and the model before any work. Tests keep these tables equal to what the code
accepts (``tests/test_config.py``).
"""

from __future__ import annotations

DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    # name: (image size, channels, classes)
    "cifar10": (32, 3, 10),
    "cifar100": (32, 3, 100),
    "svhn": (32, 3, 10),
    "tiny-imagenet": (64, 3, 200),
    "digits": (8, 1, 10),
}

# the options each built-in model takes (zsharp.models.build_model's **options)
MODEL_OPTIONS: dict[str, frozenset[str]] = {
    "resnet20": frozenset({"shortcut"}),
    "resnet32": frozenset({"shortcut"}),
    "resnet56": frozenset({"shortcut"}),
    "resnet110": frozenset({"shortcut"}),
    "vgg16_bn": frozenset(),
    "vgg19_bn": frozenset(),
    "vit": frozenset({"patch_size", "dropout", "reference_quirks"}),
    "wrn28_10": frozenset({"dropout"}),
}
TIMM_PREFIX = "timm:"

# keyword arguments of the base optimizers (torch.optim), besides params
BASE_ARGS: dict[str, frozenset[str]] = {
    "sgd": frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize",
                      "foreach", "differentiable", "fused"}),
    "adam": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "maximize",
                       "capturable", "differentiable", "fused", "decoupled_weight_decay"}),
    "adamw": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                        "foreach", "capturable", "differentiable", "fused"}),
}  # fmt: skip

# each SAM-family optimizer's own arguments (zsharp.optim.create)
_SAM = frozenset({"rho", "adaptive", "eta"})
_ZSHARP = frozenset({"percentile", "variant"})
_FRIENDLY = frozenset({"sigma", "lmbda"})
SAM_ARGS: dict[str, frozenset[str]] = {
    "sam": _SAM,
    "asam": _SAM,
    "fsam": _SAM | _FRIENDLY,
    "zsharp": _SAM | _ZSHARP,
    "zsharp-asam": _SAM | _ZSHARP,
    "zsharp-fsam": _SAM | _ZSHARP | _FRIENDLY,
}
OPTIMIZERS: tuple[str, ...] = (*BASE_ARGS, *SAM_ARGS)


def optimizer_arguments(optimizer: str, base: str) -> frozenset[str]:
    """Every keyword ``zsharp.optim.create(optimizer, ...)`` accepts with this base."""
    if optimizer in BASE_ARGS:
        return BASE_ARGS[optimizer]
    return SAM_ARGS[optimizer] | BASE_ARGS[base] | {"base"}


def is_model(name: str) -> bool:
    return name in MODEL_OPTIONS or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))
