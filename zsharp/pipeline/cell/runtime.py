"""Where a cell runs and what it runs on: the device, the precision, its data and model.

Shared by training and evaluation (each job builds these the same way).
"""

from __future__ import annotations

from pathlib import Path

import torch

from zsharp.data import DatasetNotReadyError, Prepared, download_dataset, load_prepared
from zsharp.models import build_model
from zsharp.pipeline.cell.config import CellConfig, ConfigError


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return device


def set_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Apply a cell's ``precision``; return the autocast dtype (None: no autocast).

    fp32 turns TF32 off for matmuls and cuDNN convolutions (PyTorch leaves it on for
    convolutions by default); tf32 turns both on; bf16 and fp16 autocast.
    """
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


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
