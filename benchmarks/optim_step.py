"""ZSharp's cost against SAM: a whole training step, the filter alone, and peak memory.

    python benchmarks/optim_step.py                  # this CPU, CIFAR ResNet-56, batch 128
    python benchmarks/optim_step.py --device cuda    # a GPU: bf16 autocast, channels_last

1. step: the median time of a full step (two forward/backward passes and the update) of
   SAM, ZSharp (paper) and ZSharp (official), interleaved; ratios against SAM.
2. filter: the Z-score filter on the model's real gradients vs a per-tensor
   ``torch.quantile`` loop written like the released code's ``first_step``.
3. memory: peak tensor memory during one step, ZSharp / SAM (CUDA: max_memory_allocated;
   CPU: the allocator's running total as recorded by the PyTorch profiler).
On CUDA the ZSharp step also runs once under ``torch.cuda.set_sync_debug_mode("error")``,
which fails on any host synchronisation.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, interleaved_medians, machine

import zsharp.optim as zo
from zsharp.atomic import write_json
from zsharp.models import build_model

OPTIMIZERS = {
    "sam": {"name": "sam"},
    "zsharp": {"name": "zsharp", "variant": "paper"},
    "zsharp-official": {"name": "zsharp", "variant": "official"},
}


def make_step(
    model: nn.Module, optimizer: zo.SAM, x: torch.Tensor, y: torch.Tensor, amp: bool
) -> Callable[[], None]:
    """One full SAM-family training step on a fixed batch."""
    device_type = x.device.type
    autocast = (
        (lambda: torch.autocast(device_type, dtype=torch.bfloat16))
        if amp
        else contextlib.nullcontext
    )

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.first_step(zero_grad=True)
        with zo.disable_running_stats(model), autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.second_step(zero_grad=True)

    return step


def released_filter(grads: list[torch.Tensor], percentile: float) -> list[torch.Tensor]:
    """The released code's per-tensor filter (torch.quantile, strict >, ndim > 1)."""
    out = []
    for grad in grads:
        if grad.ndim > 1:
            z = (grad - grad.mean()) / (grad.std() + 1e-12)
            threshold = torch.quantile(z.abs(), percentile / 100)
            filtered = grad.clone()
            filtered[~(z.abs() > threshold)] = 0.0
            out.append(filtered)
        else:
            out.append(grad)
    return out


def peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensor memory while ``fn`` runs (everything live counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per optimizer")
    parser.add_argument("--out", default="benchmarks/results/optim_step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    repeats = args.repeats or (100 if cuda else 12)
    timer = Timer(device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    if cuda:
        x = x.to(memory_format=memory_format)

    models, optimizers, steps = {}, {}, {}
    for label, spec in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = build_model(args.model, num_classes=10, image_size=32).to(
            device, memory_format=memory_format
        )
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        opt = zo.create(
            spec["name"], model.parameters(), base="sgd", lr=0.05, momentum=0.9, **kwargs
        )
        models[label], optimizers[label] = model, opt
        steps[label] = make_step(model, opt, x, y, amp=cuda)
    n_params = sum(p.numel() for p in models["sam"].parameters())
    print(f"{args.model}: {n_params:,} parameters, batch {args.batch_size}, {device}", flush=True)

    step_time = interleaved_medians(steps, repeats, timer)
    for label, seconds in step_time.items():
        print(
            f"step {label:16s} {seconds * 1e3:9.2f} ms  x{seconds / step_time['sam']:.3f} of SAM",
            flush=True,
        )

    # the filter alone, on this model's real gradients
    model = models["zsharp"]
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad()
    paper, official = zo.ZScoreFilter(95.0, "paper"), zo.ZScoreFilter(95.0, "official")
    big = [g for g in grads if g.ndim > 1]
    filters = {
        "released_quantile_loop": lambda: released_filter(grads, 95.0),
        "ours_official": lambda: official.apply(big, [95.0] * len(big)),
        "ours_paper": lambda: paper.apply(grads, [95.0] * len(grads)),
    }
    filter_time = interleaved_medians(filters, repeats * 3, timer)
    for label, seconds in filter_time.items():
        print(f"filter {label:24s} {seconds * 1e3:8.2f} ms", flush=True)
    speedup = {
        "official": filter_time["released_quantile_loop"] / filter_time["ours_official"],
        "paper": filter_time["released_quantile_loop"] / filter_time["ours_paper"],
    }
    print(
        f"filter speed-up vs the quantile loop: official x{speedup['official']:.1f}, "
        f"paper x{speedup['paper']:.1f}",
        flush=True,
    )

    memory = {label: peak_memory(steps[label], device) for label in steps}
    for label, peak in memory.items():
        print(
            f"peak step   {label:16s} {peak / 2**20:9.1f} MiB  x{peak / memory['sam']:.3f} of SAM"
        )

    # the ascent step alone, where ZSharp's temporaries live (activations are freed by then)
    def ascent(label: str) -> Callable[[], None]:
        def run() -> None:
            optimizers[label].first_step(zero_grad=True)
            optimizers[label].second_step(zero_grad=True)

        return run

    ascent_memory = {}
    for label in steps:
        model = models[label]
        F.cross_entropy(model(x), y).backward()
        ascent_memory[label] = peak_memory(ascent(label), device)
    for label, peak in ascent_memory.items():
        ratio = peak / ascent_memory["sam"]
        print(f"peak update {label:16s} {peak / 2**20:9.1f} MiB  x{ratio:.3f} of SAM")

    if cuda:  # no host synchronisation inside a ZSharp step
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps["zsharp"]()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print("no host sync in a ZSharp step: ok")

    write_json(
        args.out,
        {
            "benchmark": "optim_step",
            "machine": machine(),
            "device": str(device),
            "model": args.model,
            "parameters": n_params,
            "batch_size": args.batch_size,
            "repeats": repeats,
            "bf16_autocast": cuda,
            "step_seconds": step_time,
            "step_ratio_vs_sam": {k: v / step_time["sam"] for k, v in step_time.items()},
            "filter_seconds": filter_time,
            "filter_speedup_vs_quantile_loop": speedup,
            "peak_bytes": memory,
            "peak_ratio_vs_sam": {k: v / memory["sam"] for k, v in memory.items()},
            "peak_update_bytes": ascent_memory,
            "peak_update_ratio_vs_sam": {
                k: v / ascent_memory["sam"] for k, v in ascent_memory.items()
            },
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
