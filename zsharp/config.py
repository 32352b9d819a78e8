"""The configuration of one cell: dataset × model × optimizer × seed and its hyperparameters.

A :class:`CellConfig` is everything that determines the numbers a cell produces; its
:meth:`~CellConfig.digest` names a checkpoint (a run resumes only from a checkpoint of the
same configuration). :class:`Runtime` is everything that only decides *where and how fast*
it runs (device, precision, compile, paths, logging) and is not part of the digest.

Defaults depend on the dataset (:data:`DATASET_DEFAULTS`): the common SGD-momentum recipe
for the image datasets and a short, quick one for the embedded digits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from zsharp.catalog import (
    DATASET_SHAPES,
    MODEL_OPTIONS,
    OPTIMIZERS,
    is_model,
    optimizer_arguments,
)

SCHEDULES = ("cosine", "paper", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "none")
WANDB_MODES = ("offline", "online", "disabled")

# Per-dataset defaults; any field of CellConfig may be overridden on the command line.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # 1,437 training images of 8×8: a few quick epochs reach > 90 % on 2 CPU cores.
    "digits": {
        "epochs": 15,
        "batch_size": 64,
        "lr": 0.05,
        "weight_decay": 5e-4,
        "crop_padding": 1,
        "flip": False,
        "warmup_epochs": 0,
    },
    "cifar10": {"epochs": 200, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4},
    "cifar100": {"epochs": 200, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4},
    # house numbers: a mirrored digit is another digit, so no flip
    "svhn": {"epochs": 200, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "flip": False},
    "tiny-imagenet": {"epochs": 200, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4},
}


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass
class CellConfig:
    """What a cell computes. Field names are the command-line flags (``--batch-size``)."""

    dataset: str
    model: str
    optimizer: str
    seed: int = 0
    epochs: int = 200
    batch_size: int = 128
    base: str = "sgd"  # the base optimizer of the SAM family
    lr: float = 0.1
    momentum: float = 0.9  # used when the (base) optimizer is SGD
    weight_decay: float = 5e-4
    opt_args: dict[str, Any] = field(default_factory=dict)  # rho, percentile, variant, …
    schedule: str = "cosine"
    warmup_epochs: int = 0
    decay_every: int = 10  # "paper" schedule: ×decay_gamma every decay_every epochs
    decay_gamma: float = 0.75
    augment: bool = True
    crop_padding: int = 4
    flip: bool = True
    label_smoothing: float = 0.0
    model_args: dict[str, Any] = field(default_factory=dict)  # patch_size, dropout, …
    eval_batch_size: int = 1000

    def validate(self, deep: bool = True) -> CellConfig:
        """Raise :class:`ConfigError` naming the first bad key; return self.

        ``deep`` also builds the optimizer (on one scalar) and the model (on the meta
        device), which needs PyTorch; without it the checks use ``zsharp.catalog`` only.
        """
        if self.dataset not in DATASET_SHAPES:
            raise ConfigError(
                f"dataset: unknown {self.dataset!r}; choose one of {list(DATASET_SHAPES)}"
            )
        if not is_model(self.model):
            raise ConfigError(
                f"model: unknown {self.model!r}; choose one of {list(MODEL_OPTIONS)} or timm:NAME"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer: unknown {self.optimizer!r}; choose one of {list(OPTIMIZERS)}"
            )
        if self.base not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"base: must be sgd, adam or adamw, got {self.base!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        for key in ("seed", "warmup_epochs", "crop_padding"):
            _check_int(key, getattr(self, key), minimum=0)
        for key in ("epochs", "batch_size", "decay_every", "eval_batch_size"):
            _check_int(key, getattr(self, key), minimum=1)
        for key in ("lr", "momentum", "weight_decay", "decay_gamma", "label_smoothing"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{key}: must be a number >= 0, got {value!r}")
        if self.label_smoothing >= 1:
            raise ConfigError(f"label_smoothing: must be < 1, got {self.label_smoothing!r}")
        for key in ("augment", "flip"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}: must be true or false, got {getattr(self, key)!r}")
        for key in ("opt_args", "model_args"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"{key}: must be a mapping, got {getattr(self, key)!r}")
        self._check_names()
        if deep:
            self._check_buildable()
        return self

    def _check_names(self) -> None:
        """The optimizer's and the model's arguments by name (no PyTorch needed)."""
        accepted = optimizer_arguments(self.optimizer, self.base)
        for key in self.opt_args:
            if key not in accepted:
                raise ConfigError(
                    f"opt_args: unknown argument {key!r} for {self.optimizer} "
                    f"(it takes {sorted(accepted - {'base', 'lr', 'weight_decay'})})"
                )
        if self.model in MODEL_OPTIONS:
            for key in self.model_args:
                if key not in MODEL_OPTIONS[self.model]:
                    raise ConfigError(
                        f"model_args: option {key!r} does not apply to model {self.model!r} "
                        f"(its options: {sorted(MODEL_OPTIONS[self.model]) or 'none'})"
                    )
        patch = self.model_args.get("patch_size")
        size = DATASET_SHAPES[self.dataset][0]
        if (
            self.model == "vit"
            and patch is not None
            and (not isinstance(patch, int) or patch < 1 or size % patch)
        ):
            raise ConfigError(
                f"model_args: patch_size={patch!r} must be a positive integer that divides "
                f"the image size {size} of {self.dataset}"
            )

    def _check_buildable(self) -> None:
        """Build the optimizer on one scalar and the model on the meta device (no memory,
        no compute), so a bad optimizer or model argument fails before any work starts."""
        size, channels, _ = DATASET_SHAPES[self.dataset]
        try:
            _check_optimizer(self.optimizer, _frozen(self.optimizer_kwargs()))
        except (ValueError, TypeError) as error:
            raise ConfigError(f"opt_args: {error}") from None
        try:
            _check_model(self.model, size, channels, _frozen(self.model_args))
        except (ValueError, TypeError) as error:
            raise ConfigError(f"model_args: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return asdict(self)

    def digest(self) -> str:
        """A short hash of the configuration (checkpoints are valid only for it)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def sgd_based(self) -> bool:
        """Whether the optimizer that takes the descent step is SGD."""
        return self.optimizer == "sgd" or (
            self.optimizer not in ("adam", "adamw") and self.base == "sgd"
        )

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Arguments for :func:`zsharp.optim.create`."""
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.sgd_based:
            kwargs["momentum"] = self.momentum
        if self.optimizer not in ("sgd", "adam", "adamw"):
            kwargs["base"] = self.base
        kwargs.update(self.opt_args)
        if "betas" in kwargs and isinstance(kwargs["betas"], list):
            kwargs["betas"] = tuple(kwargs["betas"])
        return kwargs


@dataclass
class Runtime:
    """How a cell runs; none of it changes what is computed on a CPU."""

    out: Path
    data_root: Path = Path("data")
    checkpoint: Path | None = None  # default: <out>/checkpoint.pt
    device: str = "auto"
    amp: str = "auto"  # auto: bf16 autocast on CUDA, none on CPU
    compile: bool = False
    threads: int | None = None
    progress: str = "auto"  # auto: a bar on a terminal, a line per epoch otherwise
    wandb_mode: str | None = None  # None: $WANDB_MODE, else offline
    wandb_project: str | None = None  # None: $WANDB_PROJECT, else "zsharp"
    wandb_entity: str | None = None  # None: $WANDB_ENTITY
    wandb_dir: Path | None = None  # None: $WANDB_DIR, else <out>
    wandb_name: str | None = None  # None: <optimizer>-seed<seed>

    def validate(self) -> Runtime:
        """Raise :class:`ConfigError` naming the first bad setting; return self."""
        import torch

        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp: must be one of {list(AMP_MODES)}, got {self.amp!r}")
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise ConfigError(
                f"wandb_mode: must be one of {list(WANDB_MODES)}, got {self.wandb_mode!r}"
            )
        try:
            device = torch.device("cpu" if self.device == "auto" else self.device)
        except RuntimeError:
            raise ConfigError(f"device: not a device: {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: {self.device!r} requested but CUDA is not available")
        return self

    @property
    def wandb_directory(self) -> Path:
        """Where W&B runs land: ``wandb_dir``, else $WANDB_DIR, else the cell directory."""
        if self.wandb_dir is not None:
            return self.wandb_dir
        return Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else self.out

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint if self.checkpoint is not None else self.out / "checkpoint.pt"


def _frozen(mapping: dict[str, Any]) -> str:
    """A hashable, canonical form of a settings mapping (for the caches below)."""
    return json.dumps(mapping, sort_keys=True, default=repr)


@functools.cache
def _check_optimizer(name: str, frozen_kwargs: str) -> None:
    import torch

    from zsharp.optim import create

    kwargs = json.loads(frozen_kwargs)
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    create(name, [torch.nn.Parameter(torch.zeros(1))], **kwargs)


@functools.cache
def _check_model(name: str, image_size: int, channels: int, frozen_options: str) -> None:
    # the class count cannot make a model invalid: one build serves every dataset of a size
    import torch

    from zsharp.models import build_model

    with torch.device("meta"):
        build_model(name, 10, image_size, channels, **json.loads(frozen_options))


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")


def cell_config(
    dataset: str, model: str, optimizer: str, *, deep: bool = True, **overrides: Any
) -> CellConfig:
    """A validated CellConfig: dataclass defaults, then the dataset's, then ``overrides``."""
    known = {f.name for f in fields(CellConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown setting; known: {sorted(known)}")
    values = {**DATASET_DEFAULTS.get(dataset, {}), **overrides}
    cfg = CellConfig(dataset=dataset, model=model, optimizer=optimizer, **values)
    cfg.validate(deep=deep)
    if not cfg.sgd_based:
        # momentum is an SGD setting: recorded as 0 for Adam-based cells, so changing it
        # does not make their configuration (and checkpoint, and workflow cache) differ
        cfg.momentum = 0.0
    return cfg


def from_dict(data: dict[str, Any], deep: bool = False) -> CellConfig:
    """The CellConfig stored in a summary or checkpoint (checked when it was trained, so by
    default only by name: building a throwaway optimizer costs PyTorch's lazy imports)."""
    data = dict(data)
    return cell_config(
        data.pop("dataset"), data.pop("model"), data.pop("optimizer"), deep=deep, **data
    )
