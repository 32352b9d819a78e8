"""Where a cell runs and what it runs on: the device, the precision, its data and model.

Shared by training and evaluation (each job builds these the same way).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from zsharp.data import DatasetNotReadyError, Prepared, download_dataset, load_prepared
from zsharp.data.noise import labels_digest, noisy_labels
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


def training_data(cfg: CellConfig, root: Path) -> tuple[Prepared, dict[str, Any] | None]:
    """The cell's data as it trains on it: :func:`load_data`, its training labels made
    noisy by ``label_noise`` (zsharp.data.noise; the test labels clean). Returns it and
    what the summary records of the noise (None without noise)."""
    data = load_data(cfg, root)
    if cfg.label_noise == 0:
        return data, None
    labels = data.train_y.numpy()
    noisy = noisy_labels(
        labels,
        data.num_classes,
        cfg.label_noise,
        cfg.label_noise_kind,
        dataset=cfg.dataset,
        seed=cfg.seed,
        noise_map=cfg.spec.noise_map,
    )
    record = {
        "rate": cfg.label_noise,
        "kind": cfg.label_noise_kind,
        "wrong": int((noisy != labels).sum()),
        "labels_sha256": labels_digest(noisy),
    }
    return dataclasses.replace(data, train_y=torch.from_numpy(noisy)), record


def build_cell_model(cfg: CellConfig, data: Prepared) -> torch.nn.Module:
    """The cell's model, shaped for its dataset (classes, image size, channels)."""
    return build_model(
        cfg.model,
        num_classes=data.num_classes,
        image_size=data.image_size,
        in_channels=data.channels,
        **cfg.model_args,
    )
