"""Shared helpers of the benchmarks: timers that work on CPU and CUDA, and result files.

Every benchmark compares against a baseline measured in the same process, interleaved
with the candidate, and reports ratios of medians: these machines are noisy (±50 % between
runs), ratios measured together are not.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


class Timer:
    """Times a callable in seconds: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


class ProcessTimer:
    """Seconds of CPU time this process spends in a callable (CPU runs, one thread): on a
    shared machine wall time varies by ±50 % from step to step, the CPU time does not."""

    def __call__(self, fn: Callable[[], object]) -> float:
        begin = time.process_time()
        fn()
        return time.process_time() - begin


def interleaved_medians(
    candidates: dict[str, Callable[[], Any]], repeats: int, timer: Timer, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each candidate, run round-robin so drift hits all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            samples[name].append(timer(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
