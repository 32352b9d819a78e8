"""The step cost of every optimizer of the registry against SGD and SAM, in one process.

    python benchmarks/family_step.py                # this CPU, CIFAR ResNet-20, batch 32
    python benchmarks/family_step.py --device cuda  # a GPU, batch 128, bf16 autocast

Every optimizer runs through :class:`zsharp.optim.step.SharpnessAwareStep` on the same
fixed batch, with SGD (momentum 0.9) as the base. One sample is five consecutive steps
from step 0 (LookSAM's cycle at k = 5: one SAM step, four one-pass steps), divided by five;
the candidates are interleaved and the medians compared, as ratios to SGD's and SAM's
step. On the CPU the clock is this process's CPU time with one thread. Each optimizer gets
``zsharp.optim.params_for(name, model)`` (SAM-ON: the normalisation layers apart).
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

CYCLE = 5  # LookSAM's default k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=None, help="128 on a GPU, 32 on a CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed cycles per candidate")
    parser.add_argument("--only", nargs="*", default=None, help="these registry names only")
    parser.add_argument("--out", default="benchmarks/results/family_step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    repeats = args.repeats or (30 if cuda else 5)
    timer: Callable[[Callable[[], object]], float] = Timer(device)
    if not cuda:
        torch.set_num_threads(1)
        timer = ProcessTimer()
    batch = args.batch_size or (128 if cuda else 32)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.bfloat16 if cuda else None
    names = [n for n, info in zo.OPTIMIZERS.items() if not info.is_base or n == "sgd"]
    if args.only:
        names = [n for n in names if n in {"sgd", "sam", *args.only}]
    candidates = {}
    for name in names:
        torch.manual_seed(0)
        model = build_model(args.model, num_classes=10, image_size=32).to(device)
        info = zo.get_optimizer(name)
        params = zo.params_for(name, model)
        kwargs = {"lr": 0.01, "momentum": 0.9} | ({} if info.is_base else {"base": "sgd"})
        optimizer = zo.create(name, params, **kwargs)
        step = SharpnessAwareStep(model, optimizer, F.cross_entropy, autocast=autocast)

        def run(step: SharpnessAwareStep = step) -> None:
            step.steps = 0
            for _ in range(CYCLE):
                step(x, y)

        candidates[name] = run
    clock = "CPU time, 1 thread" if isinstance(timer, ProcessTimer) else "wall time"
    print(f"{args.model}, batch {batch}, {device}, {repeats} cycles of {CYCLE} steps, {clock}")
    medians = interleaved_medians(candidates, repeats, timer, warmup=1)  # type: ignore[arg-type]
    per_step = {name: seconds / CYCLE for name, seconds in medians.items()}
    results = {
        "machine": machine(), "model": args.model, "batch_size": batch, "clock": clock,
        "seconds_per_step": per_step,
        "ratio_vs_sgd": {n: s / per_step["sgd"] for n, s in per_step.items()},
        "ratio_vs_sam": {n: s / per_step["sam"] for n, s in per_step.items()},
    }  # fmt: skip
    for name, seconds in per_step.items():
        print(
            f"{name:16s} {seconds * 1e3:8.1f} ms/step  x{results['ratio_vs_sgd'][name]:.2f} SGD"
            f"  x{results['ratio_vs_sam'][name]:.2f} SAM",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
