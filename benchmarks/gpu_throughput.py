"""GPU throughput of small-model cells: one cell, k cells packed per GPU, the paper grid's cost.

    python benchmarks/gpu_throughput.py                  # a CUDA GPU: ≈ 7 min (--budget-s)
    python benchmarks/gpu_throughput.py --tiny           # any machine: every code path, tiny

A cell's training step as the trainer runs it: batch 256 from ``zsharp.data.DeviceLoader``
(synthetic uint8 images resident on the device, random crop + flip), channels-last, the
model from ``zsharp.models.build_model``, the optimizer from ``zsharp.optim.create``: plain
Adam (one pass) or ZSharp over Adam (two passes, BatchNorm statistics frozen in the second,
as SAM, ASAM and Friendly-SAM). Measured, in priority order, until the time budget is spent
(what is left out is marked so in the table):

1. one cell, eager, fp32 / TF32 / bf16, Adam and ZSharp, 32×32 then 64×64 (Tiny-ImageNet's
   size, 200 classes): images/s, medians of interleaved chunks (benchmarks/common.py);
2. one cell with the step's launch overhead removed: ``graph`` (the whole step, both
   passes and the updates, captured once in a CUDA graph and replayed by
   ``zsharp.optim.graphs.GraphedStep``, as a cell with ``graphs: true`` trains: fused and
   capturable Adam, the learning rate a device tensor the LR scheduler fills; on a CPU,
   ``--tiny`` runs the same code with ``capture=False``), ``compile``
   (``torch.compile(model)``, what ``runtime.compile`` does) and ``reduce-overhead``
   (``torch.compile(model, mode="reduce-overhead")``, CUDA graphs of forward and backward);
3. k cells packed on the GPU (k = 1, 2, 4, 8 processes, one cell each, started together,
   as ``zsharp-device --cells-per-gpu k`` runs them): the aggregate images/s over a common
   window, and each cell's peak memory;
4. the paper grid (config/paper.yaml: 360 cells, 200 epochs) projected in GPU-hours from
   these numbers, for each configuration measured.

Writes ``gpu_throughput.json`` and ``gpu_throughput.md`` (the tables the README shows) to
``--out-dir``; ``--data-path-json`` adds data_path.py's result (device loader vs DataLoader)
to the markdown. Without a CUDA device it says so and exits 0, unless ``--tiny``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, interleaved_medians, machine

from zsharp.data import DeviceLoader
from zsharp.models import build_model, num_parameters
from zsharp.optim import create, get_optimizer
from zsharp.optim.graphs import GraphedStep, graph_base_kwargs, tensor_lr_
from zsharp.optim.step import loss_passes, two_pass_step
from zsharp.pipeline.cell.runtime import set_precision
from zsharp.pipeline.grid.devices import mps_pipe_dir

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = "@@ "  # a worker's replies on stdout start with this (anything else is noise)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# train / test images of the paper's datasets (the upstream splits; zsharp.data's registry)
SPLITS = {
    "cifar10": (50_000, 10_000, 32),
    "cifar100": (50_000, 10_000, 32),
    "svhn": (73_257, 26_032, 32),
    "tiny-imagenet": (100_000, 10_000, 64),
}
CLASSES = {32: 10, 64: 200}
MODES = ("eager", "graph", "compile", "reduce-overhead")
# a first guess at what a unit of work costs (seconds), replaced by what the last one took
GUESS = {"single": 20.0, "modes": 10.0, "compile": 120.0, "pack": 20.0}


# --------------------------------------------------------------------------- one cell


@dataclass(frozen=True)
class Spec:
    model: str
    optimizer: str  # "adam" (one pass) or "zsharp" (two passes)
    precision: str  # fp32 | tf32 | bf16
    mode: str  # eager | graph | compile | reduce-overhead
    image_size: int
    batch: int
    images: int  # synthetic train images resident on the device

    @property
    def label(self) -> str:
        return f"{self.model}/{self.optimizer}/{self.precision}/{self.mode}/{self.image_size}"


def synthetic_images(spec: Spec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(spec.image_size)
    shape = (spec.images, 3, spec.image_size, spec.image_size)
    x = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    y = torch.randint(0, CLASSES[spec.image_size], (spec.images,), generator=generator)
    return x.to(device), y.to(device)


class Cell:
    """One cell's model, optimizer and data; ``step()`` runs one training step."""

    def __init__(self, spec: Spec, device: torch.device, data: tuple | None = None) -> None:
        if spec.mode not in MODES:
            raise ValueError(f"unknown mode {spec.mode!r}; choose one of {MODES}")
        self.spec, self.device = spec, device
        cuda = device.type == "cuda"
        self.autocast_dtype = set_precision(spec.precision, device)
        torch.manual_seed(0)
        model = build_model(
            spec.model, num_classes=CLASSES[spec.image_size], image_size=spec.image_size
        ).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.parameters = num_parameters(model)
        base: dict[str, Any] = {"lr": 1e-3, "weight_decay": 5e-5}
        if spec.mode == "graph":  # fused Adam, its step count and lr on the device
            base.update(graph_base_kwargs("adam", device))
        if spec.optimizer == "adam":
            self.optimizer = create("adam", model.parameters(), **base)
        else:
            self.optimizer = create(
                spec.optimizer, model.parameters(), base="adam", rho=0.05, **base
            )
        # every mode steps an LR scheduler per step, as the trainer does (constant here)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.graphed: GraphedStep | None = None
        if spec.mode == "graph":
            tensor_lr_(self.optimizer)  # after the scheduler: it fills this tensor
            self.graphed = GraphedStep(
                self._train,
                model=model,
                optimizer=self.optimizer,
                capture=cuda,
                warmup=1,  # warmup() sets it
                clone_outputs=False,  # the benchmark reads no output
            )
        self.forward: Callable[[torch.Tensor], torch.Tensor] = model
        if spec.mode == "compile":
            self.forward = torch.compile(model)
        elif spec.mode == "reduce-overhead":
            self.forward = torch.compile(model, mode="reduce-overhead")
        x, y = data if data is not None else synthetic_images(spec, device)
        self.loader = DeviceLoader(
            x,
            y,
            batch_size=spec.batch,
            mean=MEAN,
            std=STD,
            shuffle=True,
            augment=True,
            drop_last=True,
            device=device,
            seed=0,
            channels_last=cuda,
        )
        self.batches = self._endless()
        self.compile_seconds: float | None = None

    def _endless(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            self.loader.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # no autocast weight cache: a CUDA graph must not capture a cache filled outside it
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, cache_enabled=self.spec.mode != "graph"
        )

    def _train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The trainer's step (zsharp/train.py, CellTrainer.step) without the GradScaler and
        the scheduler; returns the loss at w (what GraphedStep needs: a tuple of tensors)."""
        if self.spec.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        passes = loss_passes(self.forward, F.cross_entropy, x, y, autocast=self._autocast)
        loss = two_pass_step(self.optimizer, self.model, passes, keep_grads=False).loss
        return (loss,)

    def warmup(self, steps: int = 3) -> None:
        """Run ``steps`` steps (compiling, or capturing the CUDA graph, on the way)."""
        set_precision(self.spec.precision, self.device)
        start = time.perf_counter()
        if self.graphed is not None:  # `steps` eager steps on a side stream, then capture
            self.graphed.warmup = max(1, steps)
            steps = self.graphed.warmup + 1
        for _ in range(steps):
            self.step()
        self.sync()
        if self.spec.mode != "eager":
            self.compile_seconds = time.perf_counter() - start

    def step(self) -> None:
        set_precision(self.spec.precision, self.device)  # cells in one process differ
        x, y = next(self.batches)
        if self.graphed is None:
            self._train(x, y)
        else:
            self.graphed(x, y)
        self.scheduler.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def seconds_per_step(cell: Cell, steps: int = 3) -> float:
    cell.sync()
    start = time.perf_counter()
    for _ in range(steps):
        cell.step()
    cell.sync()
    return (time.perf_counter() - start) / steps


# --------------------------------------------------------------------------- the budget


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.monotonic)
    cost: dict[str, float] = field(default_factory=lambda: dict(GUESS))
    skipped: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def allows(self, kind: str, what: str) -> bool:
        if self.left() >= self.cost[kind]:
            return True
        self.skipped.append(what)
        print(f"skipped (time budget): {what}", flush=True)
        return False

    @contextlib.contextmanager
    def unit(self, kind: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.cost[kind] = time.monotonic() - start


def error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:200] if text else type(error).__name__


# --------------------------------------------------------------------------- one process


def measure_group(
    specs: list[Spec], device: torch.device, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """images/s of each spec (one cell each, this process), interleaved; errors recorded."""
    results: dict[str, dict[str, Any]] = {}
    cells: dict[str, Cell] = {}
    data = synthetic_images(specs[0], device)
    for spec in specs:
        try:
            cell = Cell(spec, device, data)
            cell.warmup(args.warmup_steps)
            cells[spec.label] = cell
            results[spec.label] = {
                "parameters": cell.parameters,
                "compile_seconds": cell.compile_seconds,
            }
        except Exception as error:  # one broken candidate must not end the run
            results[spec.label] = {"error": error_text(error)}
            if args.verbose:
                traceback.print_exc()
    if not cells:
        return results
    # chunks of about --chunk-s each, so each timing covers many kernels
    chunk = {
        label: max(1, round(args.chunk_s / seconds_per_step(cell, args.warmup_steps)))
        for label, cell in cells.items()
    }

    def run(label: str) -> Callable[[], None]:
        cell, n = cells[label], chunk[label]

        def steps() -> None:
            for _ in range(n):
                cell.step()

        return steps

    try:
        medians = interleaved_medians(
            {label: run(label) for label in cells}, args.repeats, Timer(device), warmup=1
        )
    except Exception as error:
        for label in cells:
            results[label]["error"] = error_text(error)
        return results
    for label, seconds in medians.items():
        results[label]["images_per_second"] = chunk[label] * specs[0].batch / seconds
    cells.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------- packed cells


class Worker:
    """A process holding one cell at a time, driven over stdin/stdout (JSON lines)."""

    def __init__(self, args: argparse.Namespace, threads: int) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        settings = {
            "--device": args.device,
            "--threads": threads,
            "--warmup-steps": args.warmup_steps,
            "--chunk-s": args.chunk_s,
            "--repeats": args.repeats,
        }
        options = [str(x) for pair in settings.items() for x in pair]
        self.process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                *options,
                *(["--verbose"] if args.verbose else []),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                self.replies.put(json.loads(line[len(PROTOCOL) :]))
        self.replies.put({"ok": False, "error": "worker exited"})

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def reply(self, timeout: float) -> dict[str, Any]:
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:  # a late reply would answer the next request: end it
            self.process.kill()
            return {"ok": False, "error": f"no reply within {timeout:.0f} s"}

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send({"op": "exit"})
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def worker_main(args: argparse.Namespace) -> None:
    """``--worker``: prepare / run / drop a cell on request; one JSON reply per request."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cell: Cell | None = None

    def answer(message: dict[str, Any]) -> None:
        print(PROTOCOL + json.dumps(message), flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "exit":
                return
            if request["op"] == "drop":
                cell = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                answer({"ok": True})
            elif request["op"] == "prepare":
                cell = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                cell = Cell(Spec(**request["spec"]), device)
                cell.warmup(args.warmup_steps)
                step = seconds_per_step(cell, args.warmup_steps)
                peak = (
                    torch.cuda.max_memory_allocated(device) / 2**20
                    if device.type == "cuda"
                    else None  # the CPU allocator keeps no peak
                )
                answer({"ok": True, "step_seconds": step, "peak_mib": peak})
            elif request["op"] == "group":  # one process, cells interleaved
                cell = None
                specs = [Spec(**spec) for spec in request["specs"]]
                answer({"ok": True, "results": measure_group(specs, device, args)})
            elif request["op"] == "run":
                assert cell is not None, "run before prepare"
                every = max(1, round(request["sync_s"] / request["step_seconds"]))
                time.sleep(max(0.0, request["start"] - time.time()))
                start, steps = time.time(), 0
                now = start
                while now < request["end"]:
                    for _ in range(every):
                        cell.step()
                    cell.sync()
                    steps += every
                    now = time.time()
                answer({"ok": True, "images": steps * cell.spec.batch, "seconds": now - start})
        except Exception as error:
            answer({"ok": False, "error": error_text(error)})


class Workers:
    """Worker processes, reused across measurements; a dead one is replaced. Every CUDA
    call happens in them, so a failure (a CUDA graph that cannot be captured, an
    out-of-memory error) cannot spoil the measurements after it."""

    def __init__(self, args: argparse.Namespace, budget: Budget) -> None:
        self.args, self.budget, self.workers = args, budget, []
        self.threads = max(1, (os.cpu_count() or 1) // max(args.pack))

    def timeout(self) -> float:
        """How long a worker may take: --worker-timeout, and not far past the budget."""
        return min(self.args.worker_timeout, max(30.0, self.budget.left() + 30.0))

    def take(self, n: int) -> list[Worker]:
        self.workers = [w for w in self.workers if w.alive()]
        while len(self.workers) < n:
            self.workers.append(Worker(self.args, self.threads))
        return self.workers[:n]

    def group(self, specs: list[Spec]) -> dict[str, dict[str, Any]]:
        """One cell per spec in one process, interleaved (measure_group)."""
        worker = self.take(1)[0]
        worker.send({"op": "group", "specs": [asdict(spec) for spec in specs]})
        answer = worker.reply(timeout=self.timeout())
        if not answer.get("ok"):
            return {spec.label: {"error": answer["error"]} for spec in specs}
        for label, entry in answer["results"].items():
            print(f"{label:45s} {cell_text(entry):>10s} img/s", flush=True)
        return answer["results"]

    def packed(self, spec: Spec, ks: list[int]) -> dict[int, dict[str, Any]]:
        """k cells of ``spec`` at once, one per process, over a common window, for each k:
        max(ks) cells are built and warmed up, and the first k of them run."""
        args = self.args
        workers = self.take(max(ks))
        try:
            for worker in workers:
                worker.send({"op": "prepare", "spec": asdict(spec)})
            ready = [w.reply(timeout=self.timeout()) for w in workers]
            failed = [r["error"] for r in ready if not r.get("ok")]
            if failed:
                return {k: {"error": failed[0]} for k in ks}
            series = {}
            for k in ks:
                start = time.time() + 0.5
                for worker, state in zip(workers[:k], ready, strict=False):
                    worker.send(
                        {
                            "op": "run",
                            "start": start,
                            "end": start + args.pack_seconds,
                            "sync_s": args.sync_s,
                            "step_seconds": state["step_seconds"],
                        }
                    )
                timeout = args.pack_seconds + self.timeout()
                runs = [w.reply(timeout=timeout) for w in workers[:k]]
                failed = [r["error"] for r in runs if not r.get("ok")]
                series[k] = (
                    {"error": failed[0]}
                    if failed
                    else {
                        "images_per_second": sum(r["images"] / r["seconds"] for r in runs),
                        "per_cell": [r["images"] / r["seconds"] for r in runs],
                        "peak_mib_per_cell": max((r["peak_mib"] or 0) for r in ready[:k]) or None,
                    }
                )
                print(f"{spec.label} × {k}: {cell_text(series[k])} img/s", flush=True)
            return series
        finally:
            alive = [w for w in workers if w.alive()]
            for worker in alive:
                with contextlib.suppress(OSError, ValueError):
                    worker.send({"op": "drop"})
            for worker in alive:
                worker.reply(timeout=120)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


# --------------------------------------------------------------------------- projection


def paper_grid(path: Path) -> dict[str, Any]:
    """What config/paper.yaml runs: datasets, models, optimizer entries (one or two
    passes), seeds, epochs."""
    config = yaml.safe_load(path.read_text())
    entries = {}
    for label, entry in config["optimizers"].items():
        name = (entry or {}).get("optimizer", label)
        entries[label] = "adam" if get_optimizer(name).is_base else "zsharp"
    return {
        "datasets": list(config["datasets"]),
        "models": list(config["models"]),
        "entries": entries,
        "seeds": len(config["seeds"]),
        "epochs": config["train"]["epochs"],
    }


def project(grid: dict[str, Any], rate: Callable[[str, str, int], float | None]) -> dict[str, Any]:
    """GPU-hours of the grid when a cell of (model, optimizer kind, image size) trains at
    ``rate`` images/s of its GPU's time (``missing``: the first rate not measured). Each
    epoch also evaluates the test split (forward only, counted as a third of a one-pass
    step)."""
    total, longest = 0.0, 0.0
    for dataset in grid["datasets"]:
        train, test, size = SPLITS[dataset]
        for model in grid["models"]:
            for kind in grid["entries"].values():
                train_rate, eval_rate = rate(model, kind, size), rate(model, "adam", size)
                if not train_rate or not eval_rate:
                    what = kind if not train_rate else "adam"
                    return {"missing": f"{model} {what} {size}×{size}"}
                cell = grid["epochs"] * (train / train_rate + test / (3 * eval_rate))
                total += cell * grid["seeds"]
                longest = max(longest, cell)
    return {"gpu_hours": total / 3600, "longest_cell_gpu_hours": longest / 3600}


def projections(results: dict[str, Any], grid: dict[str, Any], args) -> list[dict[str, Any]]:
    single, packed = results["single"], results["packed"]

    def one(precision: str, mode: str = "eager") -> Callable[[str, str, int], float | None]:
        def rate(model: str, kind: str, size: int) -> float | None:
            def get(kind: str, mode: str) -> float | None:
                found = single.get(f"{model}/{kind}/{precision}/{mode}/{size}", {})
                return found.get("images_per_second")

            found = get(kind, mode)
            if found is None and mode != "eager":  # measured for the other kind only:
                other = "zsharp" if kind == "adam" else "adam"  # its gain over eager
                alone, theirs, their_mode = (
                    get(kind, "eager"),
                    get(other, "eager"),
                    get(other, mode),
                )
                if alone and theirs and their_mode:
                    found = alone * their_mode / theirs
            return found

        return rate

    def pack(precision: str, k: int) -> Callable[[str, str, int], float | None]:
        def rate(model: str, kind: str, size: int) -> float | None:
            alone = one(precision)(model, kind, size)
            key = f"{model}/{args.pack_optimizer}/{precision}/eager/{size}"
            base = packed.get(f"{key}/k1", {}).get("images_per_second")
            many = packed.get(f"{key}/k{k}", {}).get("images_per_second")
            if alone is None or base is None or many is None:
                return None
            # measured for the packed optimizer; the other kind gets the same gain
            return many if kind == args.pack_optimizer else alone * many / base

        return rate

    rows = []
    for precision in args.precisions:
        rows.append(
            {
                "configuration": f"1 cell per GPU, eager, {precision}",
                "k": 1,
                **project(grid, one(precision)),
            }
        )
    for mode in ("graph", "compile", "reduce-overhead"):
        if mode in args.modes:
            rows.append(
                {
                    "configuration": f"1 cell per GPU, {mode}, {args.mode_precision}",
                    "k": 1,
                    **project(grid, one(args.mode_precision, mode)),
                }
            )
    for precision in args.pack_precisions:
        for k in args.pack:
            if k > 1:
                rows.append(
                    {
                        "configuration": f"{k} cells per GPU, eager, {precision}",
                        "k": k,
                        **project(grid, pack(precision, k)),
                    }
                )
    for row in rows:
        if "gpu_hours" in row:
            # k cells share a GPU: each runs at 1/k of the GPU's rate
            row["longest_cell_hours"] = row.pop("longest_cell_gpu_hours") * row["k"]
            row["wall_hours_8_gpus"] = max(row["gpu_hours"] / 8, row["longest_cell_hours"])
    return rows


# --------------------------------------------------------------------------- the report


def number(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def cell_text(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "not run"
    if "error" in entry:
        return "error: " + entry["error"].replace("|", "/")[:60]
    return number(entry.get("images_per_second"))


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    info, single, packed = results["machine"], results["single"], results["packed"]
    lines = [
        "# GPU throughput of small-model cells",
        "",
        *(
            ["**A smoke run (--tiny: tiny batches, few models): not GPU numbers.**", ""]
            if args.tiny
            else []
        ),
        f"{info.get('gpu', info['processor'])}, PyTorch {info['torch']}, CUDA "
        f"{results['cuda']}, CUDA MPS {'on' if results['mps'] else 'off'}; "
        f"{results['date']}; {results['seconds']:.0f} s; `{results['command']}`.",
        "",
        f"Training images/s (batch {args.batch_size}, channels-last, synthetic uint8 images "
        "through zsharp.data.DeviceLoader with crop and flip); Adam: one forward-backward per "
        "step, ZSharp (SAM family): two. One cell: medians of interleaved chunks. In "
        f"parentheses: a mode's gain over eager {args.mode_precision}; `graph` is "
        "zsharp.optim.graphs.GraphedStep (the whole step in one CUDA graph, fused capturable Adam"
        + (", not captured on a CPU" if not results.get("cuda_device") else "")
        + ").",
        "",
    ]
    for size in args.sizes:
        modes = [m for m in args.modes if m != "eager"]
        head = [*(p for p in args.precisions), *(f"{args.mode_precision} {m}" for m in modes)]
        lines += [
            f"## One cell per GPU, {size}×{size} ({CLASSES[size]} classes)",
            "",
            "| model | parameters | optimizer | " + " | ".join(head) + " |",
            "|---|---|---|" + "---|" * len(head),
        ]
        for model in args.models:
            for kind in ("adam", "zsharp"):
                keys = [f"{model}/{kind}/{p}/eager/{size}" for p in args.precisions]
                keys += [f"{model}/{kind}/{args.mode_precision}/{m}/{size}" for m in modes]
                params = next(
                    (single[k]["parameters"] for k in keys if "parameters" in single.get(k, {})),
                    None,
                )
                values = [cell_text(single.get(k)) for k in keys]
                # a mode's gain over eager at the same precision: the graph column is the
                # eager-vs-graphs comparison of the step (SAM family: two passes)
                eager = single.get(f"{model}/{kind}/{args.mode_precision}/eager/{size}", {})
                base = eager.get("images_per_second")
                for i in range(len(args.precisions), len(keys)):
                    rate = single.get(keys[i], {}).get("images_per_second")
                    if rate and base:
                        values[i] += f" ({rate / base:.2f}×)"
                lines.append(
                    f"| {model} | {number(params and params / 1e6, 2)}M | {kind} | "
                    + " | ".join(values)
                    + " |"
                )
        compile_times = {
            k: v["compile_seconds"]
            for k, v in single.items()
            if k.endswith(f"/{size}") and v.get("compile_seconds")
        }
        if compile_times:
            lines += [
                "",
                "Compile / capture seconds: "
                + ", ".join(f"{k.rsplit('/', 1)[0]} {v:.1f}" for k, v in compile_times.items()),
            ]
        lines.append("")
    lines += [
        f"## k cells per GPU ({args.pack_optimizer}, eager): aggregate images/s (× k = 1)",
        "",
        "| model | size | precision | "
        + " | ".join(f"k = {k}" for k in args.pack)
        + " | peak MiB per cell |",
        "|---|---|---|" + "---|" * (len(args.pack) + 1),
    ]
    for model in args.models:
        for size in args.sizes:
            for precision in args.pack_precisions:
                key = f"{model}/{args.pack_optimizer}/{precision}/eager/{size}"
                base = packed.get(f"{key}/k1", {}).get("images_per_second")
                values, peak = [], None
                for k in args.pack:
                    entry = packed.get(f"{key}/k{k}")
                    text = cell_text(entry)
                    rate = (entry or {}).get("images_per_second")
                    if rate and base and k > 1:
                        text += f" ({rate / base:.2f}×)"
                    peak = (entry or {}).get("peak_mib_per_cell", peak)
                    values.append(text)
                lines.append(
                    f"| {model} | {size} | {precision} | "
                    + " | ".join(values)
                    + f" | {number(peak)} |"
                )
    grid = results["grid"]
    cells = len(grid["datasets"]) * len(grid["models"]) * len(grid["entries"]) * grid["seeds"]
    lines += [
        "",
        f"## The paper grid projected ({cells} cells, {grid['epochs']} epochs, config/paper.yaml)",
        "",
        "Per cell: epochs × (train images / its rate + test images / (3 × the one-pass "
        "rate)); 64×64 numbers for Tiny-ImageNet. Packed (and compiled): the gain measured "
        "for one optimizer applies to the other too. Hessian evaluation not included.",
        "",
        "| configuration | GPU-hours | wall hours on 8 GPUs | longest cell (hours) |",
        "|---|---|---|---|",
    ]
    for row in results["projection"]:
        if "gpu_hours" in row:
            lines.append(
                f"| {row['configuration']} | {number(row['gpu_hours'], 1)} | "
                f"{number(row['wall_hours_8_gpus'], 1)} | "
                f"{number(row['longest_cell_hours'], 2)} |"
            )
        else:
            lines.append(f"| {row['configuration']} | not measured: {row['missing']} | — | — |")
    data_path = results.get("data_path")
    if data_path:
        ratio = data_path["ratio_device_loader_over_dataloader"]
        ips = data_path["median_images_per_second"]
        lines += [
            "",
            "## Data path: device-resident loader vs DataLoader(num_workers="
            f"{data_path['config'].get('workers')}) + torchvision transforms "
            f"({data_path['model']}, {data_path['precision']})",
            "",
            "| what | DeviceLoader | DataLoader | ratio | goal |",
            "|---|---|---|---|---|",
            f"| training steps, images/s | {number(ips['device_loader']['train'])} | "
            f"{number(ips['dataloader']['train'])} | **{ratio['train']:.2f}×** | ≥ 3× |",
            f"| the data path alone, images/s | {number(ips['device_loader']['data'])} | "
            f"{number(ips['dataloader']['data'])} | {ratio['data']:.1f}× | — |",
        ]
    if results["skipped"]:
        lines += ["", "Left out (time budget): " + "; ".join(results["skipped"]) + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def csv(kind: type) -> Callable[[str], list]:
    return lambda text: [kind(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--models", type=csv(str), default="resnet20,resnet56,vgg16_bn,vgg19_bn,vit"
    )
    parser.add_argument("--sizes", type=csv(int), default="32,64", help="image sizes")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=8192, help="synthetic train images")
    parser.add_argument("--precisions", type=csv(str), default="fp32,tf32,bf16")
    parser.add_argument(
        "--modes",
        type=csv(str),
        default=None,
        help=f"default: {','.join(MODES)} (--tiny: eager,graph)",
    )
    parser.add_argument("--mode-precision", default="bf16", help="precision of the modes")
    parser.add_argument("--pack", type=csv(int), default="1,2,4,8", help="cells per GPU")
    parser.add_argument("--pack-precisions", type=csv(str), default="fp32,bf16")
    parser.add_argument("--pack-optimizer", default="zsharp")
    parser.add_argument("--pack-seconds", type=float, default=1.5, help="common window")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--chunk-s", type=float, default=0.1, help="seconds per timed chunk")
    parser.add_argument("--repeats", type=int, default=7, help="timed chunks per candidate")
    parser.add_argument("--sync-s", type=float, default=0.1, help="packed: sync period")
    parser.add_argument(
        "--worker-timeout",
        type=float,
        default=600.0,
        help="seconds a worker may take to answer (compiling included)",
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="total time budget")
    parser.add_argument("--grid", type=Path, default=REPO / "config" / "paper.yaml")
    parser.add_argument("--data-path-json", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results" / "gpu")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a smoke run of every code path in about a minute on a CPU",
    )
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        if args.models == csv(str)(parser.get_default("models")):
            args.models = ["resnet20", "vit"]
        args.batch_size, args.images, args.repeats, args.warmup_steps = 4, 32, 2, 1
        args.chunk_s, args.pack_seconds, args.sync_s = 0.01, 0.3, 0.01
        args.pack = [k for k in args.pack if k <= 2]
        args.precisions, args.pack_precisions = ["fp32"], ["fp32"]  # bf16: slow on a CPU
        args.budget_s = max(args.budget_s, 900.0)
        if args.modes is None:  # compiling on a CPU takes minutes
            args.modes = ["eager", "graph"]
    if args.modes is None:
        args.modes = list(MODES)
    if "eager" not in args.modes:
        args.modes = ["eager", *args.modes]
    return args


def finish(results: dict[str, Any], budget: Budget, args: argparse.Namespace) -> None:
    """Project the grid from what is measured so far; write the JSON and the markdown."""
    results["seconds"] = budget.seconds - budget.left()
    results["skipped"] = budget.skipped
    grid = paper_grid(args.grid)
    if args.tiny:  # a smoke run measures a few models: project the grid of those
        grid["models"] = [m for m in grid["models"] if m in args.models]
    results["grid"] = grid
    results["projection"] = projections(results, grid, args)
    if args.data_path_json is not None and args.data_path_json.exists():
        results["data_path"] = json.loads(args.data_path_json.read_text())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out_dir / "gpu_throughput.md").write_text(markdown(results, args))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure in priority order while the budget lasts; the files are rewritten after each
    unit, so a run stopped from outside still leaves its tables."""
    budget = Budget(args.budget_s)
    workers = Workers(args, budget)
    results: dict[str, Any] = {
        "machine": machine(),
        "cuda": torch.version.cuda,
        "cuda_device": args.device.startswith("cuda") and torch.cuda.is_available(),
        "mps": str(mps_pipe_dir()) if mps_pipe_dir() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/gpu_throughput.py", *sys.argv[1:]]),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "single": {},
        "packed": {},
    }
    single, packed = results["single"], results["packed"]

    def specs(
        model: str, size: int, pairs: list[tuple[str, str]], kinds: tuple[str, ...]
    ) -> list[Spec]:
        return [
            Spec(model, kind, precision, mode, size, args.batch_size, args.images)
            for kind in kinds
            for precision, mode in pairs
        ]

    both = ("adam", "zsharp")
    eager = [(p, "eager") for p in args.precisions]
    graph = [(args.mode_precision, m) for m in args.modes if m == "graph"]
    compiled = [(args.mode_precision, m) for m in args.modes if m in ("compile", "reduce-overhead")]

    def measure(group: list[Spec], into: dict[str, Any]) -> None:
        into.update(workers.group(group))

    def pack(spec: Spec, into: dict[str, Any]) -> None:
        series = workers.packed(spec, args.pack)
        into.update({f"{spec.label}/k{k}": entry for k, entry in series.items()})

    units: list[tuple[str, str, Callable[[], None]]] = []
    # 1. one cell, eager, every precision
    for size in args.sizes:
        for model in args.models:
            group = specs(model, size, eager, both)
            units.append(
                (
                    "single",
                    f"one cell {model} {size}×{size}",
                    functools.partial(measure, group, single),
                )
            )
    # 2a. the whole step in a CUDA graph (seconds to capture)
    for size in args.sizes:
        for model in args.models:
            if graph:
                group = specs(model, size, graph, both)
                units.append(
                    (
                        "modes",
                        f"CUDA graph {model} {size}×{size}",
                        functools.partial(measure, group, single),
                    )
                )
    # 3. k cells per GPU (the first precision at every size before the next precision)
    for precision in args.pack_precisions:
        for size in args.sizes:
            for model in args.models:
                spec = Spec(
                    model,
                    args.pack_optimizer,
                    precision,
                    "eager",
                    size,
                    args.batch_size,
                    args.images,
                )
                what = f"{model} {size}×{size} {precision} × {args.pack}"
                units.append(("pack", what, functools.partial(pack, spec, packed)))
    # 2b. torch.compile: minutes of compiling each, so the SAM family only, 32×32 only
    for model in args.models:
        if compiled:
            group = specs(model, args.sizes[0], compiled, (args.pack_optimizer,))
            units.append(
                ("compile", f"compiled {model}", functools.partial(measure, group, single))
            )

    try:
        for kind, what, work in units:
            if budget.allows(kind, what):
                with budget.unit(kind):
                    work()
                finish(results, budget, args)
    finally:
        workers.close()
    finish(results, budget, args)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    if not cuda and not args.tiny:
        print(
            "gpu_throughput: no CUDA device (--device cuda) here: nothing measured; "
            "--tiny runs every code path on the CPU"
        )
        return 0
    run(args)
    print((args.out_dir / "gpu_throughput.md").read_text())
    print(f"wrote {args.out_dir / 'gpu_throughput.md'} and gpu_throughput.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
