"""The ``zsharp`` command line: each subcommand does one job for one cell or one grid.

    zsharp download NAME --root DIR
    zsharp train --dataset D --model M --optimizer O --seed S --out DIR [hyperparameters]
    zsharp evaluate --cell DIR
    zsharp aggregate --cells DIR... --out DIR

Exit status: 0 success; 2 bad input (the message names the key or file); 3 interrupted by
SIGTERM/SIGUSR1 after writing a checkpoint (run the same command again to continue);
4 a non-finite loss (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from zsharp import __version__
from zsharp.config import AMP_MODES, WANDB_MODES, CellConfig, ConfigError, Runtime, cell_config

EXIT_BAD_INPUT = 2
_CELL_KEYS = ("dataset", "model", "optimizer")
_MAPPING_FIELDS = {"opt_args": "--opt", "model_args": "--model-arg"}


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (numbers, booleans, lists, strings)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _bool(text: str) -> bool:
    value = yaml.safe_load(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _add_cell_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cell (defaults depend on the dataset)")
    for key in _CELL_KEYS:
        group.add_argument(f"--{key}", required=True)
    hints = typing.get_type_hints(CellConfig)
    for f in fields(CellConfig):
        if f.name in _CELL_KEYS:
            continue
        if f.name in _MAPPING_FIELDS:
            group.add_argument(
                _MAPPING_FIELDS[f.name],
                dest=f.name,
                action="append",
                type=_key_value,
                metavar="KEY=VALUE",
                help=f"{f.name.replace('_', ' ')} (repeatable), e.g. rho=0.05",
            )
            continue
        kind = hints[f.name]
        parse = {int: int, float: float, bool: _bool, str: str}.get(kind, str)
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=parse,
            default=None,
            help=f"default: dataset's, else {f.default!r}",
        )


def _add_wandb_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Weights & Biases")
    group.add_argument(
        "--wandb-mode", choices=WANDB_MODES, default=None, help="default: $WANDB_MODE, else offline"
    )
    group.add_argument("--wandb-project", default=None, help="default: $WANDB_PROJECT, else zsharp")
    group.add_argument("--wandb-entity", default=None, help="default: $WANDB_ENTITY")
    group.add_argument(
        "--wandb-dir",
        type=Path,
        default=None,
        help="where offline runs land (default: the cell directory)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsharp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"zsharp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    download = commands.add_parser("download", help="fetch and prepare a dataset")
    download.add_argument("name")
    download.add_argument("--root", type=Path, default=Path("data"))
    download.add_argument(
        "--source", default=None, help="a mirror URL (file:// too) or a local file/folder"
    )
    download.add_argument(
        "--no-verify", action="store_true", help="skip the md5 check of the archives (unsafe)"
    )

    train = commands.add_parser("train", help="train one cell")
    _add_cell_arguments(train)
    run = train.add_argument_group("runtime")
    run.add_argument("--out", type=Path, required=True, help="the cell directory")
    run.add_argument("--data-root", type=Path, default=Path("data"))
    run.add_argument("--checkpoint", type=Path, default=None, help="default: <out>/checkpoint.pt")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    run.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="autocast dtype (auto: bf16 on CUDA, none on CPU)",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    run.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto")
    run.add_argument(
        "--record-failure",
        action="store_true",
        help="on a training failure (e.g. a non-finite loss) write a summary with status "
        "'failed' and exit 0, so a workflow can tabulate it (used by the Snakemake rules)",
    )
    _add_wandb_arguments(train)

    evaluate = commands.add_parser("evaluate", help="evaluate a trained cell")
    evaluate.add_argument("--cell", type=Path, required=True)
    evaluate.add_argument("--data-root", type=Path, default=Path("data"))
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--hessian-samples", type=int, default=1024)
    evaluate.add_argument("--hessian-iterations", type=int, default=20)
    evaluate.add_argument("--ece-bins", type=int, default=15)
    _add_wandb_arguments(evaluate)

    aggregate = commands.add_parser("aggregate", help="tabulate and plot finished cells")
    aggregate.add_argument("cells", nargs="+", type=Path, help="cell directories")
    aggregate.add_argument("--out", type=Path, required=True)
    aggregate.add_argument("--baseline", default="sam", help="optimizer entry compared against")
    aggregate.add_argument("--candidates", nargs="*", default=[], help="entries compared")
    aggregate.add_argument("--experiment", default="zsharp", help="the W&B group")
    _add_wandb_arguments(aggregate)
    return parser


def _train(args: argparse.Namespace) -> int:
    from zsharp.data import DatasetError
    from zsharp.train import PreemptedError, record_failure, train_cell

    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(CellConfig)
        if f.name not in _CELL_KEYS and getattr(args, f.name) is not None
    }
    for key in _MAPPING_FIELDS:
        if key in overrides:
            overrides[key] = dict(overrides[key])
    cfg = cell_config(args.dataset, args.model, args.optimizer, **overrides)
    rt = Runtime(
        out=args.out,
        data_root=args.data_root,
        checkpoint=args.checkpoint,
        device=args.device,
        amp=args.amp,
        compile=args.compile,
        threads=args.threads,
        progress=args.progress,
        wandb_mode=args.wandb_mode,
        wandb_project=args.wandb_project,
        wandb_entity=args.wandb_entity,
        wandb_dir=args.wandb_dir,
    )
    try:
        summary = train_cell(cfg, rt)
    except (PreemptedError, ConfigError, DatasetError, KeyboardInterrupt):
        raise
    except Exception as error:
        if not args.record_failure:
            raise
        record_failure(cfg, args.out, error)
        print(
            f"zsharp train: recorded a failure in {args.out / 'summary.json'}: {error}",
            file=sys.stderr,
        )
        return 0
    final = summary["final"]
    print(
        f"{args.out}: test_acc {final['test_acc']:.4f} test_loss {final['test_loss']:.4f} "
        f"(best {summary['best']['test_acc']:.4f} at epoch {summary['best']['epoch']})"
    )
    return 0


def _download(args: argparse.Namespace) -> int:
    from zsharp.data import download_dataset

    path = download_dataset(args.name, args.root, args.source, verify=not args.no_verify)
    print(path)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from zsharp.evaluate import EvalOptions, evaluate_cell

    result = evaluate_cell(
        args.cell,
        EvalOptions(
            data_root=args.data_root,
            device=args.device,
            ece_bins=args.ece_bins,
            hessian_samples=args.hessian_samples,
            hessian_iterations=args.hessian_iterations,
            wandb_mode=args.wandb_mode,
            wandb_project=args.wandb_project,
            wandb_entity=args.wandb_entity,
            wandb_dir=args.wandb_dir,
        ),
    )
    if result["status"] != "ok":
        print(f"{args.cell}: {result['status']}: {result['reason']}")
        return 0
    print(
        f"{args.cell}: test_acc {result['test_acc']:.4f} ece {result['ece']:.4f} "
        f"sharpness {result['sharpness']:.4g}"
    )
    return 0


def _aggregate(args: argparse.Namespace) -> int:
    from zsharp.aggregate import aggregate
    from zsharp.tracking import Tracker

    missing = [str(c) for c in args.cells if not c.is_dir()]
    if missing:
        raise FileNotFoundError(f"not a cell directory: {missing[0]}")
    frames = aggregate(args.cells, args.out, args.baseline, args.candidates)
    tracker = Tracker(
        mode=args.wandb_mode,
        project=args.wandb_project,
        entity=args.wandb_entity,
        directory=args.wandb_dir or args.out,
        group=args.experiment,
        name="aggregate",
        job_type="aggregate",
        config={"baseline": args.baseline, "candidates": args.candidates, "cells": len(args.cells)},
    )
    for key in ("table", "comparison"):
        frame = frames[key].astype(object).where(frames[key].notna(), None)
        tracker.log_table(key, list(frame.columns), frame.to_numpy().tolist())
    tracker.finish()
    table = frames["table"]
    print(f"{args.out}: {len(table)} cells, {int(table['failed'].sum())} failed seeds")
    return 0


COMMANDS = {
    "train": _train,
    "download": _download,
    "evaluate": _evaluate,
    "aggregate": _aggregate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (see the module docstring)."""
    from zsharp.data import DatasetError
    from zsharp.train import EXIT_INTERRUPTED, EXIT_NONFINITE, NonFiniteLossError, PreemptedError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DatasetError, ValueError, FileNotFoundError) as error:
        print(f"zsharp {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except PreemptedError as error:
        print(f"zsharp {args.command}: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as error:
        print(f"zsharp {args.command}: error: {error}", file=sys.stderr)
        return EXIT_NONFINITE


if __name__ == "__main__":
    sys.exit(main())
