"""The dataset registry: what each dataset is, where it comes from, how to check it.

Every dataset the pipeline knows is one :class:`DatasetSpec` in :data:`DATASETS`. The md5
values are the ones published upstream (and used by torchvision), so a mirror or a
pre-staged copy of the same archive passes the same check.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATASETS", "DatasetSpec", "RemoteFile", "get_spec"]


@dataclass(frozen=True)
class RemoteFile:
    """One upstream file: its canonical name, where it lives and its published md5."""

    filename: str
    url: str
    md5: str


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset.

    ``mean``/``std`` are the customary per-channel normalisation constants (pixel values
    scaled to [0, 1]); they are only a default: :func:`zsharp.data.load_prepared` returns
    the values measured on the prepared train split.
    """

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: tuple[RemoteFile, ...]
    description: str = ""

    @property
    def needs_network(self) -> bool:
        """Whether preparing this dataset fetches anything (digits ships with scikit-learn)."""
        return bool(self.files)


_KRIZ = "https://www.cs.toronto.edu/~kriz/"
_SVHN = "http://ufldl.stanford.edu/housenumbers/"

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="cifar10",
            num_classes=10,
            image_size=32,
            channels=3,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            files=(
                RemoteFile(
                    "cifar-10-python.tar.gz",
                    _KRIZ + "cifar-10-python.tar.gz",
                    "c58f30108f718f92721af3b95e74349a",
                ),
            ),
            description="CIFAR-10: 50,000 train / 10,000 test 32×32 RGB images, 10 classes",
        ),
        DatasetSpec(
            name="cifar100",
            num_classes=100,
            image_size=32,
            channels=3,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            files=(
                RemoteFile(
                    "cifar-100-python.tar.gz",
                    _KRIZ + "cifar-100-python.tar.gz",
                    "eb9058c3a382ffc7106e4002c42a8d85",
                ),
            ),
            description="CIFAR-100: 50,000 train / 10,000 test 32×32 RGB images, 100 fine classes",
        ),
        DatasetSpec(
            name="svhn",
            num_classes=10,
            image_size=32,
            channels=3,
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
            files=(
                RemoteFile(
                    "train_32x32.mat", _SVHN + "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"
                ),
                RemoteFile(
                    "test_32x32.mat", _SVHN + "test_32x32.mat", "eb5a983be6a315427106f7b3d7f46d6c"
                ),
            ),
            description="SVHN cropped digits: 73,257 train / 26,032 test 32×32 RGB images "
            "(the 'extra' split is not used)",
        ),
        DatasetSpec(
            name="tiny-imagenet",
            num_classes=200,
            image_size=64,
            channels=3,
            mean=(0.4802, 0.4481, 0.3975),
            std=(0.2770, 0.2691, 0.2821),
            files=(
                RemoteFile(
                    "tiny-imagenet-200.zip",
                    "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                    "90528d7ca1a48142e341f4ef8d21d0de",
                ),
            ),
            description="Tiny-ImageNet: 100,000 train / 10,000 val (used as test) 64×64 RGB "
            "images, 200 classes",
        ),
        DatasetSpec(
            name="digits",
            num_classes=10,
            image_size=8,
            channels=1,
            # Measured on the 80 % train split made by zsharp.data.digits (seed 0).
            mean=(0.3054,),
            std=(0.3760,),
            files=(),
            description="scikit-learn's bundled UCI digits: 1,797 8×8 grey images, split "
            "80/20 stratified with a fixed seed; works offline",
        ),
    )
}

# Spellings people type; all map to the registry key.
_ALIASES = {"tinyimagenet": "tiny-imagenet", "tiny_imagenet": "tiny-imagenet"}


def get_spec(name: str) -> DatasetSpec:
    """Return the spec for ``name`` (case-insensitive, ``_`` accepted for ``-``).

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key).replace("_", "-")
    try:
        return DATASETS[key]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise KeyError(f"unknown dataset {name!r}; known datasets: {known}") from None
