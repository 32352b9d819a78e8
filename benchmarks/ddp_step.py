"""DDP step overhead: synced ascent (two all-reduces per step) vs m-sharpness (one).

    python benchmarks/ddp_step.py                 # 2 CPU processes, gloo
    python benchmarks/ddp_step.py --world-size 4

Both ranks run, interleaved and in the same order, one DDP step of each candidate through
:class:`zsharp.optim.step.SharpnessAwareStep`: SGD (one pass, one all-reduce), ZSharp with
``ddp="synced"`` (a: the first pass is all-reduced too) and with ``ddp="m-sharpness"`` (b:
the first pass under ``no_sync``), and a bare ``all_reduce`` of a buffer the size of the
gradient. Each sample starts after a barrier and records the wall time and the process's
CPU time (one thread per rank): on a shared machine the wall time is noisy, the CPU time
is not, but it misses time spent waiting for the other rank. Two workloads: CIFAR
ResNet-20 (0.27 M parameters, 16 images per rank: compute-bound) and a wide MLP (6.3 M
parameters, 32 samples per rank: communication-bound). Rank 0 reports medians; (a) − (b)
should be about one all-reduce.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

import zsharp.optim as zo
from zsharp.models import build_model
from zsharp.optim.step import SharpnessAwareStep


def workloads() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[Any, Any]]]]:
    """name → (model builder, per-rank batch builder)."""

    def resnet() -> nn.Module:
        return build_model("resnet20", num_classes=10, image_size=32)

    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
            nn.Linear(2048, 10),
        )  # fmt: skip

    def images(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(rank)
        return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)

    def vectors(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(rank)
        return torch.randn(32, 1024, generator=g), torch.randint(0, 10, (32,), generator=g)

    return {"resnet20": (resnet, images), "mlp-6.3M": (mlp, vectors)}


def _medians(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Any]:
    """Interleaved samples of wall and CPU time; medians and ratios against SGD."""
    for fn in candidates.values():  # warm-up
        fn()
    samples: dict[str, dict[str, list[float]]] = {
        clock: {k: [] for k in candidates} for clock in ("wall", "cpu")
    }
    for _ in range(repeats):
        for label, fn in candidates.items():
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            samples["wall"][label].append(time.perf_counter() - wall)
            samples["cpu"][label].append(time.process_time() - cpu)
    out: dict[str, Any] = {}
    for clock, by_label in samples.items():
        medians = {k: statistics.median(v) for k, v in by_label.items()}
        out[clock] = {
            "seconds": medians,
            "ratio_vs_sgd": {k: v / medians["sgd"] for k, v in medians.items()},
            "synced_minus_m_sharpness": medians["zsharp-synced"] - medians["zsharp-m-sharpness"],
        }
    return out


def _worker(rank: int, world: int, rendezvous: str, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    results: dict[str, Any] = {}
    for name, (build, batch) in workloads().items():
        x, y = batch(rank)
        candidates: dict[str, Callable[[], Any]] = {}
        for label, optimizer, mode in [
            ("sgd", "sgd", "synced"),
            ("zsharp-synced", "zsharp", "synced"),
            ("zsharp-m-sharpness", "zsharp", "m-sharpness"),
        ]:
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(build())
            opt = zo.create(optimizer, model.parameters(), lr=0.01, momentum=0.9)
            step = SharpnessAwareStep(model, opt, F.cross_entropy, ddp=mode)
            candidates[label] = lambda step=step, x=x, y=y: step(x, y)
        n_params = sum(p.numel() for p in build().parameters())
        buffer = torch.zeros(n_params)
        candidates["all_reduce"] = lambda buffer=buffer: dist.all_reduce(buffer)
        results[name] = {"parameters": n_params, **_medians(candidates, repeats)}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/ddp_step.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rank0 = Path(tmp) / "rank0.json"
        torch.multiprocessing.spawn(
            _worker,
            args=(args.world_size, str(Path(tmp) / "rendezvous"), args.repeats, str(rank0)),
            nprocs=args.world_size,
            join=True,
        )
        results = json.loads(rank0.read_text())
    for name, r in results.items():
        print(f"{name} ({r['parameters']:,} parameters), {args.world_size} processes, gloo:")
        wall, cpu = r["wall"], r["cpu"]
        for label in wall["seconds"]:
            print(
                f"  {label:20s} wall {wall['seconds'][label] * 1e3:9.2f} ms "
                f"x{wall['ratio_vs_sgd'][label]:.3f} of SGD | "
                f"CPU {cpu['seconds'][label] * 1e3:9.2f} ms x{cpu['ratio_vs_sgd'][label]:.3f}"
            )
        print(
            f"  (a) synced − (b) m-sharpness: wall {wall['synced_minus_m_sharpness'] * 1e3:.2f} ms,"
            f" CPU {cpu['synced_minus_m_sharpness'] * 1e3:.2f} ms per step"
        )
    payload = {"machine": machine(), "world_size": args.world_size, "workloads": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
