"""The cost of ``diagnostics=True``, and of ZSharp against SAM, per training step.

    python benchmarks/diagnostics_step.py                 # this CPU, CIFAR ResNet-20, batch 128
    python benchmarks/diagnostics_step.py --device cuda   # a GPU: bf16 autocast, sync check

Candidates, each with its own model copy and SGD (momentum 0.9) as the base: SAM, SAM with
diagnostics, ZSharp (paper variant) and ZSharp with diagnostics. Two measurements, the
candidates interleaved round-robin and compared by their medians:

1. step: a whole two-pass training step on a fixed batch (what the issue's ≤ 1.03× bound
   is about: ZSharp + diagnostics / ZSharp and ZSharp / SAM);
2. update: ``first_step`` + ``second_step`` alone on fixed gradients, no forward or
   backward: all the optimizer's own work, so the diagnostics' share of it is the
   harshest ratio there is.

On the CPU the clock is this process's CPU time with one thread (``time.process_time``):
on a shared machine wall time varies by ±50 % from step to step, the CPU time a step
consumes does not. On CUDA the ZSharp step with diagnostics also runs once under
``torch.cuda.set_sync_debug_mode("error")``, which fails on any host synchronisation.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, interleaved_medians, machine

import zsharp.optim as zo
from zsharp.atomic import write_json
from zsharp.models import build_model

CANDIDATES: dict[str, dict[str, Any]] = {
    "sam": {"name": "sam"},
    "sam+diagnostics": {"name": "sam", "diagnostics": True},
    "zsharp": {"name": "zsharp", "variant": "paper"},
    "zsharp+diagnostics": {"name": "zsharp", "variant": "paper", "diagnostics": True},
}
RATIOS = {
    "zsharp+diagnostics / zsharp": ("zsharp+diagnostics", "zsharp"),
    "zsharp / sam": ("zsharp", "sam"),
    "zsharp+diagnostics / sam": ("zsharp+diagnostics", "sam"),
    "sam+diagnostics / sam": ("sam+diagnostics", "sam"),
}


class ProcessTimer:
    """Seconds of CPU time this process spends in a callable (CPU runs, one thread)."""

    def __call__(self, fn: Callable[[], object]) -> float:
        begin = time.process_time()
        fn()
        return time.process_time() - begin


def make_step(
    model: nn.Module, optimizer: zo.SAM, x: torch.Tensor, y: torch.Tensor, amp: bool
) -> Callable[[], None]:
    """One full two-pass step on a fixed batch; the diagnostics are read (not synced) as
    a training loop would, summed into a running total on the device."""
    autocast = (
        (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16))
        if amp
        else contextlib.nullcontext
    )
    totals: dict[str, torch.Tensor] = {}

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.first_step(zero_grad=True)
        for key, value in optimizer.diagnostics.items():
            totals[key] = totals[key] + value if key in totals else value
        with zo.disable_running_stats(model), autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.second_step(zero_grad=True)

    return step


def make_update(optimizer: zo.SAM) -> Callable[[], None]:
    """The optimizer's work alone: ascent and descent on the gradients already in .grad."""

    def update() -> None:
        optimizer.first_step()
        optimizer.second_step()

    return update


def ratios(seconds: dict[str, float]) -> dict[str, float]:
    return {label: seconds[a] / seconds[b] for label, (a, b) in RATIOS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per candidate")
    parser.add_argument("--out", default="benchmarks/results/diagnostics_step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    repeats = args.repeats or (100 if cuda else 15)
    timer: Callable[[Callable[[], object]], float] = Timer(device) if cuda else ProcessTimer()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    models, optimizers, steps = {}, {}, {}
    for label, spec in CANDIDATES.items():
        torch.manual_seed(0)
        model = build_model(args.model, num_classes=10, image_size=32).to(device)
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        optimizers[label] = zo.create(
            spec["name"], model.parameters(), base="sgd", lr=0.05, momentum=0.9, **kwargs
        )
        models[label] = model
        steps[label] = make_step(model, optimizers[label], x, y, amp=cuda)
    n_params = sum(p.numel() for p in models["sam"].parameters())
    print(f"{args.model}: {n_params:,} parameters, batch {args.batch_size}, {device}", flush=True)

    step_time = interleaved_medians(steps, repeats, timer)
    step_ratio = ratios(step_time)
    for label, seconds in step_time.items():
        print(f"step   {label:20s} {seconds * 1e3:9.2f} ms", flush=True)
    for label, value in step_ratio.items():
        print(f"step   {label:28s} x{value:.4f}", flush=True)

    updates = {}
    for label, model in models.items():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        updates[label] = make_update(optimizers[label])
    update_time = interleaved_medians(updates, repeats * 10, timer)
    update_ratio = ratios(update_time)
    for label, seconds in update_time.items():
        print(f"update {label:20s} {seconds * 1e3:9.3f} ms", flush=True)
    for label, value in update_ratio.items():
        print(f"update {label:28s} x{value:.4f}", flush=True)

    if cuda:  # no host synchronisation inside a ZSharp step with diagnostics
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps["zsharp+diagnostics"]()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print("no host sync in a ZSharp step with diagnostics: ok")

    write_json(
        args.out,
        {
            "benchmark": "diagnostics_step",
            "machine": machine(),
            "device": str(device),
            "clock": "cuda events" if cuda else "process CPU time, 1 thread",
            "model": args.model,
            "parameters": n_params,
            "batch_size": args.batch_size,
            "repeats": repeats,
            "bf16_autocast": cuda,
            "step_seconds": step_time,
            "step_ratios": step_ratio,
            "update_seconds": update_time,
            "update_ratios": update_ratio,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
