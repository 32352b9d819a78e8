"""The configuration of one cell: dataset × model × optimizer × seed and its hyperparameters.

A :class:`CellConfig` is everything that determines the numbers a cell produces; its
:meth:`~CellConfig.digest` names a checkpoint (a run resumes only from a checkpoint of the
same configuration) and it travels whole, as one JSON document, from the workflow to
``zsharp train --config``. :class:`Runtime` is everything that only decides *where and how
fast* it runs (device, compile, paths, logging) and is not part of the digest.

Every setting's type, default and range is one :class:`~zsharp.optim.args.Arg` (the
``SETTINGS`` table below); the command-line flags, the workflow schema and the checks here
are all made from it. The optimizer's own arguments (``opt_args``) and the model's options
(``model_args``) are checked against their registries; the dataset's registry entry
supplies its recipe defaults. Nothing here imports PyTorch unless asked to build.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from zsharp.data.registry import DATASETS, get_spec
from zsharp.models.registry import get_model, is_timm
from zsharp.optim.args import Arg, ArgError, check_args
from zsharp.optim.registry import base_names, get_optimizer
from zsharp.pipeline.cell.folder import CHECKPOINT

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
WANDB_MODES = ("offline", "online", "disabled")
# np.random.seed takes seeds below 2**32, and every generator of a cell is seeded with it
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the key."""


def _setting(arg: Arg) -> Any:
    """A CellConfig field whose default and rule are ``arg``."""
    return field(default=arg.default, metadata={"arg": arg})


@dataclass
class CellConfig:
    """What a cell computes. Field names are the command-line flags (``--batch-size``)."""

    dataset: str
    model: str
    optimizer: str
    seed: int = _setting(Arg("seed", "integer", 0, "seeds every generator", 0, MAX_SEED))
    epochs: int = _setting(Arg("epochs", "integer", 200, "training epochs", minimum=1))
    batch_size: int = _setting(Arg("batch_size", "integer", 128, "images per step", minimum=1))
    base: str = _setting(
        Arg("base", "string", "sgd", "the base optimizer of the SAM family",
            choices=tuple(base_names()))
    )  # fmt: skip
    lr: float = _setting(Arg("lr", "number", 0.1, "base learning rate", minimum=0))
    momentum: float = _setting(
        Arg("momentum", "number", 0.9, "SGD momentum (ignored by Adam-based optimizers)",
            minimum=0)
    )  # fmt: skip
    weight_decay: float = _setting(
        Arg("weight_decay", "number", 5e-4, "the base optimizer's weight decay", minimum=0)
    )
    # the optimizer's own arguments (rho, percentile, …), checked by its registry entry
    opt_args: dict[str, Any] = field(default_factory=dict)
    schedule: str = _setting(
        Arg("schedule", "string", "cosine", "cosine; paper: ×decay_gamma every decay_every "
            "epochs after the warm-up; constant", choices=("cosine", "paper", "constant"))
    )  # fmt: skip
    warmup_epochs: int = _setting(
        Arg("warmup_epochs", "integer", 0, "linear warm-up epochs", minimum=0)
    )
    warmup_per_epoch: bool = _setting(
        Arg("warmup_per_epoch", "boolean", False, "set the LR once per epoch, the warm-up "
            "starting at 0 (0, 1/W, …, 1 × lr) and the schedule after it counted from epoch "
            "W + 1, as the released code's GradualWarmupScheduler; false: a per-step ramp")
    )  # fmt: skip
    decay_every: int = _setting(
        Arg("decay_every", "integer", 10, "paper schedule: epochs between decays", minimum=1)
    )
    decay_gamma: float = _setting(
        Arg("decay_gamma", "number", 0.75, "paper schedule: the decay factor", minimum=0)
    )
    augment: bool = _setting(Arg("augment", "boolean", True, "random crop + flip"))
    crop_padding: int = _setting(
        Arg("crop_padding", "integer", 4, "padding of the random crop", minimum=0)
    )
    flip: bool = _setting(Arg("flip", "boolean", True, "include the horizontal flip"))
    label_noise: float = _setting(
        Arg("label_noise", "number", 0.0, "the fraction r of training labels made wrong "
            "(the test set stays clean), drawn per (dataset, seed)", minimum=0, maximum=1,
            exclusive_maximum=True)
    )  # fmt: skip
    label_noise_kind: str = _setting(
        Arg("label_noise_kind", "string", "symmetric", "symmetric: exactly r·N labels "
            "replaced by one of the other classes, uniformly; asymmetric: each label of a "
            "source class flipped to its target with probability r (CIFAR-10's map of "
            "Patrini et al. 2017)", choices=("symmetric", "asymmetric"))
    )  # fmt: skip
    label_smoothing: float = _setting(
        Arg("label_smoothing", "number", 0.0, "label smoothing of the loss", minimum=0,
            maximum=1, exclusive_maximum=True)
    )  # fmt: skip
    # the model's options (patch_size, dropout, …), checked by its registry entry
    model_args: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = _setting(
        Arg("eval_batch_size", "integer", 1000, "batch size of the per-epoch test", minimum=1)
    )
    precision: str = _setting(
        Arg("precision", "string", "fp32", "fp32: full float32, TF32 off; tf32: float32 "
            "with TF32 matmuls and convolutions (CUDA); bf16, fp16: autocast (fp16 with a "
            "GradScaler)", choices=PRECISIONS)
    )  # fmt: skip
    bn_both_passes: bool = _setting(
        Arg("bn_both_passes", "boolean", False, "BatchNorm running statistics updated in "
            "both forward passes of a sharpness-aware step (the released code); false: the "
            "first pass only, so each batch counts once")
    )  # fmt: skip
    adaptive_scope: str = _setting(
        Arg("adaptive_scope", "string", "all", "which tensors ASAM scales by T = |w| + η: "
            "all, or weights (tensors named *weight*; others T = 1, as the released code's "
            "ASAM)", choices=("all", "weights"))
    )  # fmt: skip
    sam_interval: int = _setting(
        Arg("sam_interval", "integer", 1, "k: a sharpness-aware step every k-th step and the "
            "base optimizer's step otherwise (LookSAM's SAM-k; about 1 + 1/k passes a step)",
            minimum=1)
    )  # fmt: skip
    micro_batches: int = _setting(
        Arg("micro_batches", "integer", 1, "k: each batch split into k micro-batches whose "
            "gradients are accumulated (the step of the whole batch; for a model with "
            "BatchNorm each micro-batch is normalised by its own statistics)", minimum=1)
    )  # fmt: skip
    max_grad_norm: float | None = _setting(
        Arg("max_grad_norm", "number", None, "clip the descent gradient to this global "
            "2-norm (torch.nn.utils.clip_grad_norm_'s rule); null: no clipping",
            minimum=0, exclusive_minimum=True, nullable=True)
    )  # fmt: skip
    train_metrics_at: str = _setting(
        Arg("train_metrics_at", "string", "w", "where a sharpness-aware step's training "
            "loss and accuracy are measured: w, or w+eps (the released code)",
            choices=("w", "w+eps"))
    )  # fmt: skip
    ddp: str = _setting(
        Arg("ddp", "string", "synced", "a cell on several processes: synced (the ascent "
            "gradient all-reduced: the step of one process on the global batch) or "
            "m-sharpness (each rank's ε from its own shard, m = batch_size / processes)",
            choices=("synced", "m-sharpness"))
    )  # fmt: skip
    sync_bn: bool = _setting(
        Arg("sync_bn", "boolean", False, "a cell on several GPUs: BatchNorm statistics "
            "over the global batch (SyncBatchNorm); false: each rank's shard, rank 0's "
            "running statistics kept")
    )  # fmt: skip

    def validate(self, deep: bool = True) -> CellConfig:
        """Check every value in place (numbers normalised); raise :class:`ConfigError`
        naming the first bad key; return self.

        ``deep`` also builds the optimizer (on one scalar) and the model (on the meta
        device), which imports PyTorch; without it the registries' rules alone apply.
        """
        _name("dataset", self.dataset, DATASETS, "")
        for key, lookup in (("model", get_model), ("optimizer", get_optimizer)):
            try:
                lookup(getattr(self, key))
            except ValueError as error:
                raise ConfigError(f"{key}: {error}") from None
        for arg in SETTINGS:
            try:
                setattr(self, arg.name, arg.check(getattr(self, arg.name)))
            except ArgError as error:
                raise ConfigError(str(error)) from None
        for key in ("opt_args", "model_args"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"{key}: must be a mapping, got {getattr(self, key)!r}")
        info = get_optimizer(self.optimizer)
        try:
            checked = check_args(
                self.optimizer_args(), self.opt_args, f"optimizer {self.optimizer!r}"
            )
            # the resolved configuration records every argument of a sharpness-aware
            # optimizer, its defaults included: the summary says what ran
            self.opt_args = {**({} if info.is_base else info.defaults), **checked}
        except ArgError as error:
            raise ConfigError(f"opt_args.{error}") from None
        if not is_timm(self.model):
            try:
                self.model_args = get_model(self.model).check_options(
                    self.model_args, self.spec.image_size
                )
            except ArgError as error:
                raise ConfigError(f"model_args.{error}") from None
        if self.adaptive_scope != "all" and not self.adaptive:
            raise ConfigError(
                f"adaptive_scope: {self.adaptive_scope!r} applies to ASAM only (asam, "
                f"zsharp-asam, or adaptive: true), not to {self.optimizer}"
            )
        if (
            self.label_noise > 0
            and self.label_noise_kind == "asymmetric"
            and not (self.spec.noise_map)
        ):
            raise ConfigError(
                f"label_noise_kind: asymmetric noise has no class map for {self.dataset} "
                "(defined for: "
                + ", ".join(n for n, s in DATASETS.items() if s.noise_map)
                + "); use symmetric"
            )
        if self.micro_batches > self.batch_size:
            raise ConfigError(
                f"micro_batches: {self.micro_batches} is more than the batch_size of "
                f"{self.batch_size}; each micro-batch needs at least one image"
            )
        if self.sam_interval != 1 and get_optimizer(self.optimizer).is_base:
            raise ConfigError(
                f"sam_interval: applies to sharpness-aware optimizers, not to {self.optimizer}"
            )
        if deep:
            self._check_buildable()
        return self

    @property
    def adaptive(self) -> bool:
        """Whether the optimizer scales its neighbourhood by T = |w| + η (ASAM)."""
        info = get_optimizer(self.optimizer)
        return bool(info.fixed.get("adaptive", self.opt_args.get("adaptive", False)))

    @property
    def spec(self) -> Any:
        """The dataset's registry entry."""
        return get_spec(self.dataset)

    def optimizer_args(self) -> tuple[Arg, ...]:
        """Every argument ``opt_args`` may set: the optimizer's own and, for the SAM family,
        its base optimizer's (lr, weight_decay and momentum are settings of their own)."""
        info = get_optimizer(self.optimizer)
        own = info.args if not info.is_base else ()
        base = get_optimizer(self.optimizer if info.is_base else self.base).args
        settings = {"lr", "weight_decay", "momentum"}
        return (*own, *(a for a in base if a.name not in settings))

    def _check_buildable(self) -> None:
        """Build the optimizer on one scalar and the model on the meta device (no memory,
        no compute), so what only the code knows fails before any work starts."""
        spec = self.spec
        try:
            _check_optimizer(self.optimizer, _frozen(self.optimizer_kwargs()))
        except (ValueError, TypeError) as error:
            raise ConfigError(f"opt_args: {error}") from None
        try:
            _check_model(self.model, spec.image_size, spec.channels, _frozen(self.model_args))
        except (ValueError, TypeError) as error:
            raise ConfigError(f"model_args: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))

    def digest(self) -> str:
        """A short hash of the configuration (checkpoints are valid only for it)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def sgd_based(self) -> bool:
        """Whether the optimizer that takes the descent step is SGD."""
        info = get_optimizer(self.optimizer)
        return (self.optimizer if info.is_base else self.base) == "sgd"

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Arguments for :func:`zsharp.optim.create`."""
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.sgd_based:
            kwargs["momentum"] = self.momentum
        if not get_optimizer(self.optimizer).is_base:
            kwargs["base"] = self.base
        kwargs.update(self.opt_args)
        if isinstance(kwargs.get("betas"), list):
            kwargs["betas"] = tuple(kwargs["betas"])
        return kwargs


SETTINGS: tuple[Arg, ...] = tuple(f.metadata["arg"] for f in fields(CellConfig) if f.metadata)
MAPPINGS: tuple[str, ...] = ("opt_args", "model_args")
CELL_KEYS = ("dataset", "model", "optimizer")


@dataclass
class Runtime:
    """How a cell runs; none of it changes what is computed on a CPU."""

    out: Path
    data_root: Path = Path("data")
    checkpoint: Path | None = None  # default: <out>/checkpoint.pt
    device: str = "auto"
    compile: bool = False
    graphs: bool = False  # the step as CUDA graphs (zsharp.optim.graphs)
    threads: int | None = None
    progress: str = "auto"  # auto: a bar on a terminal, a line per epoch otherwise
    wandb_mode: str | None = None  # None: $WANDB_MODE, else offline
    wandb_project: str | None = None  # None: $WANDB_PROJECT, else "zsharp"
    wandb_entity: str | None = None  # None: $WANDB_ENTITY
    wandb_dir: Path | None = None  # None: $WANDB_DIR, else <out>
    wandb_name: str | None = None  # None: zsharp.pipeline.cell.config.run_name(label, seed)
    label: str | None = None  # the grid's optimizer entry (default: the optimizer's name)
    key: str | None = None  # the cell's key in its grid, dataset/model/label/seedN
    matched: dict[str, Any] | None = None  # a matched control's record (zsharp.pipeline.grid)

    def validate(self) -> Runtime:
        """Raise :class:`ConfigError` naming the first bad setting; return self."""
        import torch

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
        return self.checkpoint if self.checkpoint is not None else self.out / CHECKPOINT


# --- evaluation --------------------------------------------------------------------------

EVALUATE: tuple[Arg, ...] = (
    Arg("hessian_samples", "integer", 1024, "training images in the fixed subset of the "
        "sharpness estimate", minimum=1),
    Arg("hessian_iterations", "integer", 20, "at most this many Hessian-vector products "
        "(stops at 1e-3 relative change)", minimum=1),
    Arg("hessian_batch_size", "integer", 256, "images per Hessian-vector product batch",
        minimum=1),
    Arg("ece_bins", "integer", 15, "equal-width confidence bins of the ECE", minimum=1),
)  # fmt: skip


# --- names shared by the workflow, the command line and the aggregate ---------------------


def run_group(dataset: str, model: str) -> str:
    """The W&B group of a cell: its dataset and model."""
    return f"{dataset}-{model}"


def run_name(label: str, seed: int) -> str:
    """The W&B run name of a cell: its optimizer entry and seed."""
    return f"{label}-seed{seed}"


def _name(key: str, value: Any, known: dict[str, Any], extra: str) -> None:
    if value not in known:
        raise ConfigError(f"{key}: unknown {value!r}; choose one of {list(known)}{extra}")


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


def cell_config(
    dataset: str, model: str, optimizer: str, *, deep: bool = True, **overrides: Any
) -> CellConfig:
    """A validated CellConfig: field defaults, then the dataset's recipe, then ``overrides``."""
    known = {f.name for f in fields(CellConfig)} - set(CELL_KEYS)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown setting; known: {sorted(known)}")
    if dataset not in DATASETS:
        _name("dataset", dataset, DATASETS, "")
    values = {**get_spec(dataset).defaults, **overrides}
    cfg = CellConfig(dataset=dataset, model=model, optimizer=optimizer, **values)
    cfg.validate(deep=deep)
    if not cfg.sgd_based:
        # momentum is an SGD setting: recorded as 0 for Adam-based cells, so changing it
        # does not make their configuration (and checkpoint, and workflow cache) differ
        cfg.momentum = 0.0
    return cfg


def from_dict(data: dict[str, Any], deep: bool = False) -> CellConfig:
    """The CellConfig of a JSON document (a summary's ``config``, ``zsharp train --config``);
    checked by the registries' rules, and by building only when ``deep``."""
    if not isinstance(data, dict):
        raise ConfigError(f"(config): must be a mapping, got {type(data).__name__}")
    data = dict(data)
    missing = [key for key in CELL_KEYS if key not in data]
    if missing:
        raise ConfigError(f"{missing[0]}: required but missing")
    return cell_config(
        data.pop("dataset"), data.pop("model"), data.pop("optimizer"), deep=deep, **data
    )
