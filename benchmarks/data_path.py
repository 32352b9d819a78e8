"""Throughput of the device-resident data path vs a torchvision DataLoader.

Both pipelines serve the same CIFAR-shaped synthetic uint8 data with the same augmentation
(random crop, zero padding 4, random horizontal flip, normalisation) and feed the same
model and training step (SGD, cross-entropy). Two numbers per pipeline, medians over
repeats that alternate between the pipelines (so drift in machine speed hits both):

* train: images/s of full training steps (data + forward + backward + update);
* data:  images/s of producing batches on the device, no model.

The baseline is what a torchvision CIFAR script does: a ``Dataset`` of HWC uint8 arrays
turned into PIL images, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
``ToTensor``, ``Normalize``, and ``DataLoader(num_workers=2, pin_memory=<on CUDA>,
persistent_workers=True)``.

Usage::

    python benchmarks/data_path.py                       # CPU, ~2 min on 2 cores
    python benchmarks/data_path.py --device cuda --steps 100 --data-steps 300

On CUDA the model runs channels-last under bf16 autocast, and timings synchronise the
device before reading the clock.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from zsharp.data import DeviceLoader

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--images", type=int, default=5000, help="synthetic train images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per repeat")
    parser.add_argument("--data-steps", type=int, default=30, help="timed batches, data only")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "data_path.json"
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- pipelines


class PilCifar(Dataset):
    """torchvision.datasets.CIFAR10's ``__getitem__``: HWC uint8 -> PIL -> transforms."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images = images_hwc
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def dataloader_batches(
    x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> Batches:
    """Endless batches from the torchvision-style baseline, moved to ``device``."""
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    dataset = PilCifar(x.permute(0, 2, 3, 1).numpy().copy(), y.numpy(), transform)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    cuda = device.type == "cuda"
    while True:
        for xb, yb in loader:
            xb = xb.to(device, non_blocking=True)
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb.to(device, non_blocking=True)


def device_batches(
    x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> Batches:
    """Endless batches from :class:`zsharp.data.DeviceLoader`."""
    loader = DeviceLoader(
        x,
        y,
        batch_size=args.batch_size,
        mean=MEAN,
        std=STD,
        shuffle=True,
        augment=True,
        drop_last=True,
        device=device,
        seed=args.seed,
        channels_last=device.type == "cuda",
    )
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


PIPELINES = {"device_loader": device_batches, "dataloader": dataloader_batches}


# --------------------------------------------------------------------------- model


class SmallCNN(nn.Module):
    """Fallback model when zsharp.models is not available: 3 conv blocks + linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def build_model(device: torch.device) -> tuple[nn.Module, str]:
    """ResNet-20 from zsharp.models if that module exists, else :class:`SmallCNN`."""
    if importlib.util.find_spec("zsharp.models") is not None:
        from zsharp.models import build_model as zsharp_build_model

        model, name = zsharp_build_model("resnet20", num_classes=10, image_size=32), "resnet20"
    else:
        model, name = SmallCNN(), "small-cnn (zsharp.models not found)"
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.to(device), name


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so the host clock measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(model: nn.Module, device: torch.device) -> Callable[[Any, Any], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    use_bf16 = device.type == "cuda"

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def images_per_second(
    batches: Batches,
    consume: Callable[[torch.Tensor, torch.Tensor], None],
    steps: int,
    warmup: int,
    device: torch.device,
) -> float:
    """Throughput of ``steps`` batches through ``consume`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        consume(*next(batches))
    synchronize(device)
    start = time.perf_counter()
    seen = 0
    for _ in range(steps):
        x, y = next(batches)
        consume(x, y)
        seen += len(y)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def touch(x: torch.Tensor, y: torch.Tensor) -> None:
    """Data-only consumer: nothing to do; the batch already exists on the device."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), generator=generator, dtype=torch.uint8)
    y = torch.randint(0, 10, (args.images,), generator=generator)
    model, model_name = build_model(device)
    step = make_train_step(model, device)
    streams = {name: make(x, y, args, device) for name, make in PIPELINES.items()}
    samples: dict[str, dict[str, list[float]]] = {n: {"train": [], "data": []} for n in streams}
    for repeat in range(args.repeats):
        for name, batches in streams.items():
            train = images_per_second(batches, step, args.steps, args.warmup, device)
            data = images_per_second(batches, touch, args.data_steps, args.warmup, device)
            samples[name]["train"].append(train)
            samples[name]["data"].append(data)
            print(f"repeat {repeat}: {name:14s} train {train:9.1f} img/s   data {data:10.1f} img/s")
    medians = {
        name: {kind: statistics.median(values) for kind, values in kinds.items()}
        for name, kinds in samples.items()
    }
    ratios = {
        kind: medians["device_loader"][kind] / medians["dataloader"][kind]
        for kind in ("train", "data")
    }
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "model": model_name,
        "precision": "bf16 autocast, channels_last" if device.type == "cuda" else "fp32",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "images_per_second": samples,
        "median_images_per_second": medians,
        "ratio_device_loader_over_dataloader": ratios,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    ratios = results["ratio_device_loader_over_dataloader"]
    print(f"model: {results['model']} on {results['device']} ({results['precision']})")
    for kind in ("train", "data"):
        ours = results["median_images_per_second"]["device_loader"][kind]
        theirs = results["median_images_per_second"]["dataloader"][kind]
        print(
            f"{kind:5s}: DeviceLoader {ours:10.1f} img/s  DataLoader {theirs:10.1f} img/s  "
            f"ratio {ratios[kind]:6.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
