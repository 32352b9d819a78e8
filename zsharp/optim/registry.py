"""The optimizer registry: every optimizer ``create()`` builds, as data.

One :class:`OptimizerInfo` per name holds what the rest of the project needs to know about
an optimizer: the class (a lazy ``"module:Class"`` path, so reading the registry does not
import PyTorch), its own arguments as :class:`~zsharp.optim.args.Arg` (type, default,
range), arguments it always passes (ASAM's ``adaptive=True``), and whether it is a base
optimizer (``torch.optim``) or a sharpness-aware wrapper around one. ``create()``, the
workflow's config validation and schema, the command line and the README's tables all read
it; a new optimizer is one :func:`register_optimizer` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zsharp.optim.args import Arg


def load_object(path: str) -> Any:
    """The object a ``"package.module:attribute"`` path names, imported on first use."""
    module, _, attribute = path.partition(":")
    if not module or not attribute:
        raise ValueError(f"expected 'module:attribute', got {path!r}")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class OptimizerInfo:
    """What one optimizer name means.

    ``target`` is called as ``target(params, **kwargs)`` for a base optimizer and as
    ``target(params, base_class, **kwargs)`` for a sharpness-aware one; ``args`` are the
    arguments it takes besides the base optimizer's (for a base optimizer: all of them);
    ``fixed`` arguments are always passed and cannot be set.
    """

    name: str
    target: str
    args: tuple[Arg, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    is_base: bool = False
    description: str = ""
    reference: str = ""
    #: how a training loop groups a model's parameters for it: "all" (one group), or
    #: "normalization" (zsharp.optim.samon.normalization_groups: SAM-ON's)
    groups: str = "all"

    @property
    def arg_names(self) -> frozenset[str]:
        return frozenset(a.name for a in self.args)

    @property
    def defaults(self) -> dict[str, Any]:
        """The default of every argument that has one."""
        return {a.name: a.default for a in self.args if a.default is not None}

    def load(self) -> Any:
        """The class (or builder) behind this name."""
        return load_object(self.target)


OPTIMIZERS: dict[str, OptimizerInfo] = {}


def register_optimizer(info: OptimizerInfo) -> OptimizerInfo:
    """Add ``info`` to the registry (a name may be registered once); return it."""
    if info.name in OPTIMIZERS:
        raise ValueError(f"optimizer {info.name!r} is already registered")
    OPTIMIZERS[info.name] = info
    return info


def get_optimizer(name: str) -> OptimizerInfo:
    """The registry entry of ``name``, or a ValueError listing the known names."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def base_names() -> list[str]:
    """The base optimizers a sharpness-aware one can wrap."""
    return [name for name, info in OPTIMIZERS.items() if info.is_base]


def sharpness_aware_names() -> list[str]:
    return [name for name, info in OPTIMIZERS.items() if not info.is_base]


# --- the arguments -------------------------------------------------------------------------

LR = Arg("lr", "number", 1e-3, "learning rate", minimum=0)
WEIGHT_DECAY = Arg("weight_decay", "number", 0.0, "L2 penalty (AdamW: decoupled)", minimum=0)
_SGD_ARGS = (
    Arg("lr", "number", 1e-3, "learning rate", minimum=0),
    Arg("momentum", "number", 0.0, "momentum factor", minimum=0),
    Arg("dampening", "number", 0.0, "dampening of the momentum", minimum=0),
    Arg("weight_decay", "number", 0.0, "L2 penalty", minimum=0),
    Arg("nesterov", "boolean", False, "Nesterov momentum"),
)


def _adam_args(weight_decay: float) -> tuple[Arg, ...]:
    return (
        Arg("lr", "number", 1e-3, "learning rate", minimum=0),
        Arg("betas", "numbers", (0.9, 0.999), "(β₁, β₂)", length=2),
        Arg("eps", "number", 1e-8, "added to the denominator", minimum=0),
        Arg("weight_decay", "number", weight_decay, "weight decay", minimum=0),
        Arg("amsgrad", "boolean", False, "the AMSGrad variant"),
    )


def _rho(default: float) -> Arg:
    return Arg("rho", "number", default, "neighbourhood radius ρ", minimum=0)


def _eta(default: float) -> Arg:
    return Arg("eta", "number", default, "ASAM's η in T_w = |w| + η", minimum=0)


ADAPTIVE = Arg("adaptive", "boolean", False, "ASAM's scale-invariant neighbourhood")
PERCENTILE = Arg(
    "percentile",
    "number",
    95.0,
    "p: each tensor keeps its entries above the p-th percentile of |z| (95: the top 5 %)",
    minimum=0,
    maximum=100,
    exclusive_maximum=True,
)
VARIANT = Arg(
    "variant",
    "string",
    "paper",
    "paper: the equations; official: the released code",
    choices=("paper", "official"),
)
SIGMA = Arg("sigma", "number", 1.0, "F-SAM's σ: share of the moving average removed", minimum=0)
LMBDA = Arg(
    "lmbda", "number", 0.9, "F-SAM's λ: decay of the moving average", minimum=0, maximum=1,
    exclusive_maximum=True,
)  # fmt: skip

GSAM_ARGS = (
    _rho(0.05),
    Arg("rho_min", "number", None, "GSAM's ρ at lr_min (null: rho, a constant radius)",
        minimum=0, nullable=True),
    Arg("alpha", "number", 0.4, "GSAM's α: share of the gradient's component orthogonal "
        "to the perturbed one removed from the descent", minimum=0),
    Arg("lr_max", "number", None, "GSAM: the learning rate of radius rho (null: the base "
        "learning rate)", minimum=0, nullable=True),
    Arg("lr_min", "number", 0.0, "GSAM: the learning rate of radius rho_min", minimum=0),
    ADAPTIVE,
    _eta(0.0),
)  # fmt: skip
LOOKSAM_ARGS = (
    _rho(0.1),
    Arg("k", "integer", 5, "LookSAM: a SAM step every k-th step, its direction reused "
        "in between", minimum=1),
    Arg("alpha", "number", 0.7, "LookSAM's α: weight of the reused direction", minimum=0),
    ADAPTIVE,
    _eta(0.0),
)  # fmt: skip
WSAM_ARGS = (
    _rho(0.05),
    Arg("gamma", "number", 0.9, "WSAM's γ: weight of sharpness in the loss, α = γ/(1−γ)",
        minimum=0, maximum=1, exclusive_maximum=True),
    Arg("decouple", "boolean", True, "WSAM: the base optimizer steps with g, the "
        "sharpness term apart"),
    Arg("max_norm", "number", None, "WSAM: clip g and the perturbed gradient each to this "
        "2-norm (null: off)", minimum=0, exclusive_minimum=True, nullable=True),
    ADAPTIVE,
    _eta(0.0),
)  # fmt: skip
VASSO_ARGS = (
    _rho(0.05),
    Arg("theta", "number", 0.9, "VaSSO's θ: weight of the newest gradient in the "
        "averaged ascent direction", minimum=0, maximum=1),
    ADAPTIVE,
    _eta(0.0),
)  # fmt: skip
SAMON_ARGS = (_rho(0.5), ADAPTIVE, _eta(0.0))
SAM_ARGS = (_rho(0.05), ADAPTIVE, _eta(0.0))
ASAM_ARGS = (_rho(0.5), _eta(0.01))  # ASAM's own radius (Kwon et al. 2021), adaptive fixed
ZSCORE_ARGS = (PERCENTILE, VARIANT)
FRIENDLY_ARGS = (SIGMA, LMBDA)

_SAM_PAPER = "Foret et al. 2021, arXiv 2010.01412"
_ASAM_PAPER = "Kwon et al. 2021, arXiv 2102.11600"
_FSAM_PAPER = "Li et al. 2024, arXiv 2403.12350"
_ZSHARP_PAPER = "arXiv 2505.02369"
_GSAM_PAPER = "Zhuang et al. 2022, arXiv 2203.08065"
_LOOKSAM_PAPER = "Liu et al. 2022, arXiv 2203.02714"
_WSAM_PAPER = "Yue et al. 2023, arXiv 2305.15817"
_VASSO_PAPER = "Li & Giannakis 2023, arXiv 2309.15639"
_SAMON_PAPER = "Mueller et al. 2023, arXiv 2306.04226"

# The SAM family beyond SAM, ASAM and Friendly-SAM: (name, class, its arguments, what,
# reference, how a loop groups the parameters); each also registered with the Z-score filter
# on its ascent as "zsharp-<name>"
_FAMILY = (
    ("gsam", "GSAM", GSAM_ARGS, "GSAM: descent without the gradient's component orthogonal "
     "to the perturbed one; ρ tied to the LR", _GSAM_PAPER, "all"),
    ("looksam", "LookSAM", LOOKSAM_ARGS, "LookSAM: a SAM step every k steps, its "
     "orthogonal direction reused in between", _LOOKSAM_PAPER, "all"),
    ("wsam", "WSAM", WSAM_ARGS, "WSAM: sharpness weighted by γ/(1−γ) as a regulariser",
     _WSAM_PAPER, "all"),
    ("vasso", "VaSSO", VASSO_ARGS, "VaSSO: ascent along a moving average of the gradient",
     _VASSO_PAPER, "all"),
    ("sam-on", "SAMON", SAMON_ARGS, "SAM-ON: only the normalisation layers perturbed",
     _SAMON_PAPER, "normalization"),
)  # fmt: skip
_MODULES = {"GSAM": "gsam", "LookSAM": "looksam", "WSAM": "wsam", "VaSSO": "vasso",
            "SAMON": "samon"}  # fmt: skip

for _info in (
    OptimizerInfo("sgd", "torch.optim:SGD", _SGD_ARGS, is_base=True,
                  description="SGD (with momentum)"),
    OptimizerInfo("adam", "torch.optim:Adam", _adam_args(0.0), is_base=True,
                  description="Adam"),
    OptimizerInfo("adamw", "torch.optim:AdamW", _adam_args(1e-2), is_base=True,
                  description="AdamW"),
    OptimizerInfo("sam", "zsharp.optim.sam:SAM", SAM_ARGS,
                  description="SAM", reference=_SAM_PAPER),
    OptimizerInfo("asam", "zsharp.optim.sam:SAM", ASAM_ARGS, fixed={"adaptive": True},
                  description="ASAM, T_w = |w| + η", reference=_ASAM_PAPER),
    OptimizerInfo("fsam", "zsharp.optim.friendly:FriendlySAM", SAM_ARGS + FRIENDLY_ARGS,
                  description="Friendly-SAM", reference=_FSAM_PAPER),
    OptimizerInfo("zsharp", "zsharp.optim.zsharp:ZSharp", SAM_ARGS + ZSCORE_ARGS,
                  description="ZSharp: SAM with layer-wise Z-score filtered ascent",
                  reference=_ZSHARP_PAPER),
    OptimizerInfo("zsharp-asam", "zsharp.optim.zsharp:ZSharp", ASAM_ARGS + ZSCORE_ARGS,
                  fixed={"adaptive": True}, description="ZSharp on ASAM",
                  reference=_ZSHARP_PAPER),
    OptimizerInfo("zsharp-fsam", "zsharp.optim.zsharp:ZSharpFriendly",
                  SAM_ARGS + FRIENDLY_ARGS + ZSCORE_ARGS, description="ZSharp on Friendly-SAM",
                  reference=_ZSHARP_PAPER),
):  # fmt: skip
    register_optimizer(_info)

for _name, _cls, _args, _what, _paper, _groups in _FAMILY:
    register_optimizer(OptimizerInfo(
        _name, f"zsharp.optim.{_MODULES[_cls]}:{_cls}", _args, description=_what,
        reference=_paper, groups=_groups,
    ))  # fmt: skip
    register_optimizer(OptimizerInfo(
        f"zsharp-{_name}", f"zsharp.optim.zsharp:ZSharp{_cls}", _args + ZSCORE_ARGS,
        description=f"ZSharp on {_what.split(':')[0]}", reference=f"{_ZSHARP_PAPER}; {_paper}",
        groups=_groups,
    ))  # fmt: skip
