"""The dataset registry: the one place that says what each dataset is.

Every dataset the pipeline knows is one :class:`DatasetSpec` in :data:`DATASETS`, added by
:func:`register_dataset`. A spec holds plain data (shape, classes, training defaults) and two
kinds of lazy reference, so this module imports neither PyTorch nor torchvision (the
Snakemake dry run validates whole grids with it):

* ``prepare``: ``"module:function"``, the function that stages the splits;
* ``files_from``: ``"module:function"`` returning the upstream files, for datasets whose
  URLs and md5s are published by an authority we can read at run time. CIFAR-10/100 and SVHN
  take theirs from torchvision's dataset classes, never from a copy: a hand-copied SVHN md5
  was once wrong (issue 16) and no test built on our own archives could notice.

A dataset with no upstream class (Tiny-ImageNet) lists its :class:`RemoteFile` values in
``files``; ``tests/test_data.py`` pins each against the value other loaders publish.

Adding a dataset is one ``register_dataset(DatasetSpec(...))`` and its prepare function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: importing them would pull in torch
    from pathlib import Path

    from zsharp.data.prepared import Staging

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "PrepareFn",
    "RemoteFile",
    "get_spec",
    "register_dataset",
    "resolve",
]

# prepare(files, stage) -> metadata: ``files`` maps each upstream file name to a local path
# (empty for a dataset with no remote files); the function stages the train and test splits
# and returns what only it knows (class names, label mapping).
PrepareFn = Callable[["Mapping[str, Path]", "Staging"], dict[str, Any]]


@dataclass(frozen=True)
class RemoteFile:
    """One upstream file: its canonical name, where it lives and its published md5."""

    filename: str
    url: str
    md5: str


class _ReadOnlyDict(dict[str, Any]):
    """A dict that refuses changes.

    A spec's defaults are shared by every caller, so an in-place edit would silently change
    the recipe of every later cell. Still a ``dict``, so json, pickle, copy and
    ``dataclasses.asdict`` treat it as one (a ``MappingProxyType`` breaks all four).
    """

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("dataset defaults are read-only; copy them first: dict(spec.defaults)")

    __setitem__ = __delitem__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        return (type(self), (dict(self),))


def _canonical(name: str) -> str:
    """How :func:`get_spec` normalises what people type: lower case, ``-`` for ``_``."""
    return name.strip().lower().replace("_", "-")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the pipeline needs to know about one dataset.

    Attributes:
        name: registry key; lower case, ``-`` rather than ``_`` (what :func:`get_spec`
            normalises any spelling to).
        num_classes, image_size, channels: the prepared arrays' shape (square images).
        mean, std: customary per-channel normalisation constants (pixel values in [0, 1]);
            only a default: :func:`zsharp.data.load_prepared` returns the values measured on
            the prepared train split.
        prepare: ``"module:function"`` of the :data:`PrepareFn` that stages the splits.
        files: the upstream files, when this spec is their source of truth.
        files_from: ``"module:function"`` returning the upstream files, when an authority
            (torchvision) publishes them; called only when a download starts.
        defaults: the training recipe for this dataset (any ``CellConfig`` field); read-only.
        aliases: other spellings :func:`get_spec` accepts.
        description: one line for help texts and the README.
        noise_map: the class-dependent ("asymmetric") label noise of this dataset, as
            (source class, target class) pairs: each label of a source class becomes its
            target with the noise rate's probability (Patrini et al. 2017 for CIFAR-10);
            empty: no such noise is defined.
    """

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    prepare: str
    files: tuple[RemoteFile, ...] = ()
    files_from: str | None = None
    # Not hashed: a dict cannot be; equal specs still compare equal on it.
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    aliases: tuple[str, ...] = ()
    description: str = ""
    noise_map: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if _canonical(self.name) != self.name or not self.name:
            raise ValueError(
                f"dataset name {self.name!r} must be lower case with '-' rather than '_' "
                f"(e.g. {_canonical(self.name)!r})"
            )
        for label, path in (("prepare", self.prepare), ("files_from", self.files_from)):
            if path is not None and not _is_lazy_path(path):
                raise ValueError(
                    f"dataset {self.name!r}: {label} must be 'module:function', got {path!r}"
                )
        if self.files and self.files_from is not None:
            raise ValueError(f"dataset {self.name!r}: give files or files_from, not both")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"dataset {self.name!r}: mean and std need {self.channels} values")
        # Frozen dataclass: assign through object to normalise the field once.
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "defaults", _ReadOnlyDict(self.defaults))
        object.__setattr__(self, "aliases", tuple(_canonical(a) for a in self.aliases))

    @property
    def needs_network(self) -> bool:
        """Whether preparing this dataset starts from upstream files (known without imports)."""
        return bool(self.files) or self.files_from is not None

    def remote_files(self) -> tuple[RemoteFile, ...]:
        """The upstream files: ``files``, or what ``files_from`` returns (imported now)."""
        if self.files_from is None:
            return self.files
        files = tuple(resolve(self.files_from)())
        if not files or not all(isinstance(f, RemoteFile) for f in files):
            raise TypeError(
                f"dataset {self.name!r}: {self.files_from} must return RemoteFile values"
            )
        return files

    def preparer(self) -> PrepareFn:
        """The prepare function (imported now)."""
        return resolve(self.prepare)


def _is_lazy_path(path: str) -> bool:
    module, sep, attr = path.partition(":")
    return bool(sep and module and attr)


def resolve(path: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute.

    Raises:
        ImportError: one line naming the path, when the module or the attribute is missing.
    """
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import {module_name} for {path!r}: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ImportError(f"{module_name} has no {attribute!r} (from {path!r})") from None


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` and return it.

    Raises:
        ValueError: the name or an alias is already taken (the message names it).
    """
    taken = {key: other.name for other in DATASETS.values() for key in (other.name, *other.aliases)}
    for key in (spec.name, *spec.aliases):
        if key in taken:
            raise ValueError(f"dataset {key!r} is already registered (by {taken[key]!r})")
    DATASETS[spec.name] = spec
    return spec


def get_spec(name: str) -> DatasetSpec:
    """Return the spec for ``name`` (case-insensitive, ``_`` accepted for ``-``, aliases).

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    key = _canonical(name)
    if key in DATASETS:
        return DATASETS[key]
    for spec in DATASETS.values():
        if key in spec.aliases:
            return spec
    known = ", ".join(sorted(DATASETS))
    raise KeyError(f"unknown dataset {name!r}; known datasets: {known}")


# --------------------------------------------------------------------------- built-ins

# The image datasets' recipe: the usual SGD one (the paper's Adam recipe is a config).
_IMAGE_DEFAULTS: dict[str, Any] = {
    "epochs": 200,
    "batch_size": 128,
    "lr": 0.1,
    "weight_decay": 5e-4,
}

register_dataset(
    DatasetSpec(
        name="cifar10",
        num_classes=10,
        image_size=32,
        channels=3,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        files_from="zsharp.data.formats:cifar10_files",
        prepare="zsharp.data.formats:parse_cifar10",
        defaults=_IMAGE_DEFAULTS,
        description="CIFAR-10: 50,000 train / 10,000 test 32×32 RGB images, 10 classes",
        # Patrini et al. 2017 (giorgiop/loss-correction, noise.py): truck → automobile,
        # bird → airplane, deer → horse, cat ↔ dog
        noise_map=((9, 1), (2, 0), (4, 7), (3, 5), (5, 3)),
    )
)
register_dataset(
    DatasetSpec(
        name="cifar100",
        num_classes=100,
        image_size=32,
        channels=3,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        files_from="zsharp.data.formats:cifar100_files",
        prepare="zsharp.data.formats:parse_cifar100",
        defaults=_IMAGE_DEFAULTS,
        description="CIFAR-100: 50,000 train / 10,000 test 32×32 RGB images, 100 fine classes",
    )
)
register_dataset(
    DatasetSpec(
        name="svhn",
        num_classes=10,
        image_size=32,
        channels=3,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        files_from="zsharp.data.formats:svhn_files",
        prepare="zsharp.data.formats:parse_svhn",
        # house numbers: a mirrored digit is another digit, so no flip
        defaults={**_IMAGE_DEFAULTS, "flip": False},
        description="SVHN cropped digits: 73,257 train / 26,032 test 32×32 RGB images "
        "(the 'extra' split is not used)",
    )
)
register_dataset(
    DatasetSpec(
        name="tiny-imagenet",
        num_classes=200,
        image_size=64,
        channels=3,
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2770, 0.2691, 0.2821),
        # torchvision has no Tiny-ImageNet class, so this is the source of truth. The md5 is
        # the one ContinualAI/avalanche and ENSTA-U2IS-AI/torch-uncertainty publish for the
        # same URL (tests/test_data.py pins it to that value).
        files=(
            RemoteFile(
                "tiny-imagenet-200.zip",
                "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                "90528d7ca1a48142e341f4ef8d21d0de",
            ),
        ),
        prepare="zsharp.data.formats:parse_tiny_imagenet",
        defaults=_IMAGE_DEFAULTS,
        aliases=("tinyimagenet",),
        description="Tiny-ImageNet: 100,000 train / 10,000 val (used as test) 64×64 RGB "
        "images, 200 classes",
    )
)
register_dataset(
    DatasetSpec(
        name="digits",
        num_classes=10,
        image_size=8,
        channels=1,
        # Measured on the 80 % train split made by zsharp.data.digits (seed 0).
        mean=(0.3054,),
        std=(0.3760,),
        prepare="zsharp.data.digits:prepare_digits",
        # 1,437 training images of 8×8: a few quick epochs reach > 90 % on 2 CPU cores.
        defaults={
            "epochs": 15,
            "batch_size": 64,
            "lr": 0.05,
            "weight_decay": 5e-4,
            "crop_padding": 1,
            "flip": False,
            "warmup_epochs": 0,
        },
        description="scikit-learn's bundled UCI digits: 1,797 8×8 grey images, split "
        "80/20 stratified with a fixed seed; works offline",
    )
)
