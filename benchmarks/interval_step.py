"""The cost of ``interval=k`` against SGD: a sharpness-aware step every k-th step.

    python benchmarks/interval_step.py                # this CPU, CIFAR ResNet-20, batch 32
    python benchmarks/interval_step.py --device cuda  # a GPU, batch 128, bf16 autocast

Every candidate runs through :class:`zsharp.optim.step.SharpnessAwareStep` on the same
fixed batch: SGD (one pass per step), and ZSharp with ``interval`` 1, 2, 4 and 8. One
sample is a cycle of k steps (one two-pass step and k − 1 base steps) divided by k; the
candidates are interleaved and the medians compared. On the CPU the clock is this
process's CPU time with one thread (``time.process_time``): on a shared machine wall time
varies by ±50 % from step to step, the CPU time a step consumes does not. A two-pass step
costs about two SGD steps, so ``interval=k`` should cost about 1 + 1/k (2, 1.5, 1.25,
1.125) SGD steps, plus the filter's share on the two-pass steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ProcessTimer, Timer, interleaved_medians, machine

import zsharp.optim as zo
from zsharp.models import build_model
from zsharp.optim.step import SharpnessAwareStep

INTERVALS = (1, 2, 4, 8)


def cycle(step: SharpnessAwareStep, k: int, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """k consecutive steps, starting at a two-pass one."""

    def run() -> None:
        step.steps = 0
        for _ in range(k):
            step(x, y)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=None, help="128 on a GPU, 32 on a CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed cycles per candidate")
    parser.add_argument("--out", default="benchmarks/results/interval_step.json")
    parser.add_argument("--wall", action="store_true", help="CPU: wall time, default threads")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    repeats = args.repeats or (50 if cuda else 10)
    timer: Callable[[Callable[[], object]], float] = Timer(device)
    if not cuda and not args.wall:
        torch.set_num_threads(1)
        timer = ProcessTimer()
    args.batch_size = args.batch_size or (128 if cuda else 32)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    autocast = torch.bfloat16 if cuda else None

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(args.model, num_classes=10, image_size=32).to(device)

    candidates, per_cycle = {}, {}
    sgd_model = model()
    sgd = zo.create("sgd", sgd_model.parameters(), lr=0.01, momentum=0.9)
    sgd_step = SharpnessAwareStep(sgd_model, sgd, F.cross_entropy, autocast=autocast)
    candidates["sgd"] = cycle(sgd_step, 1, x, y)
    per_cycle["sgd"] = 1
    for k in INTERVALS:
        m = model()
        opt = zo.create("zsharp", m.parameters(), base="sgd", lr=0.01, momentum=0.9)
        step = SharpnessAwareStep(m, opt, F.cross_entropy, interval=k, autocast=autocast)
        candidates[f"zsharp-interval{k}"] = cycle(step, k, x, y)
        per_cycle[f"zsharp-interval{k}"] = k
    clock = "CPU time, 1 thread" if isinstance(timer, ProcessTimer) else "wall time"
    print(f"{args.model}, batch {args.batch_size}, {device}, {repeats} cycles, {clock}")
    medians = interleaved_medians(candidates, repeats, timer, warmup=1)  # type: ignore[arg-type]
    per_step = {name: seconds / per_cycle[name] for name, seconds in medians.items()}
    results = {"machine": machine(), "model": args.model, "batch_size": args.batch_size}
    results["clock"] = clock
    results["seconds_per_step"] = per_step
    results["ratio_vs_sgd"] = {name: s / per_step["sgd"] for name, s in per_step.items()}
    for name, seconds in per_step.items():
        expected = "" if name == "sgd" else f" (1 + 1/k = {1 + 1 / per_cycle[name]:.3f})"
        ratio = results["ratio_vs_sgd"][name]
        print(f"{name:20s} {seconds * 1e3:9.2f} ms/step  x{ratio:.3f} of SGD{expected}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
