"""Where a cell runs and what it runs on: the device, the precision, its data and model.

Shared by training and evaluation (each job builds these the same way).
"""

from __future__ import annotations

from pathlib import Path

import torch

from zsharp.config import CellConfig, ConfigError
from zsharp.data import DatasetNotReadyError, Prepared, download_dataset, load_prepared
from zsharp.models import build_model


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return device


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 on CUDA and full precision on the CPU."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]


def load_data(cfg: CellConfig, root: Path) -> Prepared:
    """The prepared dataset; one that needs no download (the embedded digits) is prepared
    on first use."""
    try:
        return load_prepared(cfg.dataset, root)
    except DatasetNotReadyError:
        if cfg.spec.needs_network:
            raise
        download_dataset(cfg.dataset, root)
        return load_prepared(cfg.dataset, root)


def build_cell_model(cfg: CellConfig, data: Prepared) -> torch.nn.Module:
    """The cell's model, shaped for its dataset (classes, image size, channels)."""
    return build_model(
        cfg.model,
        num_classes=data.num_classes,
        image_size=data.image_size,
        in_channels=data.channels,
        **cfg.model_args,
    )
