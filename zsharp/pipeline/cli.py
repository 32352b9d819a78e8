"""The ``zsharp`` command line: each subcommand does one job for one cell or one grid.

    zsharp download NAME --root DIR
    zsharp train --dataset D --model M --optimizer O --seed S --out DIR [hyperparameters]
    zsharp evaluate --cell DIR
    zsharp aggregate CELL_DIR... --out DIR

Exit status: 0 success; 1 an unexpected error (a bug: its traceback is printed); 2 bad
input (the message names the key or file, and nothing was started), a cell in use by
another process (the message names it), or a refused output folder; 3 interrupted by
SIGTERM/SIGUSR1/SIGINT after writing a checkpoint (run the same command again to continue); 4 a
non-finite loss (the last good checkpoint is kept); 5 a transient fault (a full disk, an
I/O error, out of memory): one line names the file and errno, nothing is recorded, and the
same command run again continues from the last checkpoint.

Runtime settings that do not change what a cell computes can also come from the
environment (the Snakemake workflow sets them from its config): ``ZSHARP_DEVICE``,
``ZSHARP_COMPILE``, ``ZSHARP_WANDB_TIMEOUT`` (the longest W&B may make a job wait), and
W&B's own ``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_DIR``;
``ZSHARP_GRAPHS`` (CUDA graphs), ``ZSHARP_PROCESSES`` (a data-parallel cell's processes) and
``ZSHARP_DDP_TIMEOUT`` (seconds a collective may wait for a rank).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from zsharp import __version__
from zsharp.data.registry import DATASETS
from zsharp.models.registry import MODELS
from zsharp.optim.args import Arg, as_number
from zsharp.optim.registry import OPTIMIZERS
from zsharp.pipeline.cell.config import (
    CELL_KEYS,
    EVALUATE,
    SETTINGS,
    WANDB_MODES,
    ConfigError,
    Runtime,
    from_dict,
)
from zsharp.pipeline.plugins import PluginError, load_plugins

EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 5  # a full disk, an I/O error, out of memory: run the command again
_MAPPING_FIELDS = {"opt_args": "--opt", "model_args": "--model-arg"}


def _value(text: str) -> Any:
    """A value as YAML reads it (numbers, booleans, lists, strings); YAML 1.1 reads ``5e-2``
    as text, which :func:`~zsharp.optim.args.as_number` makes a number again."""
    return as_number(yaml.safe_load(text))


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read by :func:`_value`."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), _value(value)


def _processes(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _bool(text: str) -> bool:
    value = yaml.safe_load(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _dataset_defaults_text() -> str:
    lines = [
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        for name, spec in DATASETS.items()
    ]
    return "defaults per dataset (others: the default shown per flag): " + "; ".join(lines)


_PARSE = {"integer": int, "number": _float, "boolean": _bool, "string": str}


def _flag(group: argparse._ArgumentGroup, arg: Arg, default: Any = None) -> None:
    """A ``--name`` flag for ``arg``: its type, choices, and help from the Arg."""
    shown = arg.default if default is None else default
    group.add_argument(
        f"--{arg.name.replace('_', '-')}",
        dest=arg.name,
        type=_PARSE.get(arg.kind, str),
        default=default,
        choices=arg.choices,
        help=f"{arg.help}{'; ' if arg.help else ''}default {shown!r}",
    )


def _add_cell_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cell", _dataset_defaults_text())
    group.add_argument(
        "--config",
        dest="config_doc",
        metavar="JSON|FILE",
        default=None,
        help="the cell's configuration as one JSON document, or a JSON/YAML file holding "
        "it (a cell's summary.json too); the flags below override its values",
    )
    group.add_argument("--dataset", choices=list(DATASETS))
    group.add_argument("--model", metavar="MODEL", help=f"one of {', '.join(MODELS)}, or timm:NAME")
    group.add_argument("--optimizer", choices=list(OPTIMIZERS))
    for arg in SETTINGS:
        _flag(group, arg)
    group.add_argument(
        "--opt", dest="opt_args", action="append", type=_key_value, metavar="KEY=VALUE",
        help="the optimizer's own argument (repeatable), e.g. rho=0.05, percentile=95, "
        "variant=official, sigma=1",
    )  # fmt: skip
    group.add_argument(
        "--model-arg", dest="model_args", action="append", type=_key_value, metavar="KEY=VALUE",
        help="a model option (repeatable), e.g. patch_size=4 (vit), shortcut=B (resnets)",
    )  # fmt: skip


def _add_data_and_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument(
        "--device",
        default=os.environ.get("ZSHARP_DEVICE", "auto"),
        help="auto, cpu, cuda, cuda:1, … (default: $ZSHARP_DEVICE, else auto)",
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _add_wandb_arguments(parser: argparse.ArgumentParser, named: bool = False) -> None:
    group = parser.add_argument_group("Weights & Biases")
    if named:
        group.add_argument(
            "--wandb-name", default=None, help="the run's name (default: ENTRY-seedN)"
        )
    group.add_argument(
        "--wandb-mode", choices=WANDB_MODES, default=None, help="default: $WANDB_MODE, else offline"
    )
    group.add_argument("--wandb-project", default=None, help="default: $WANDB_PROJECT, else zsharp")
    group.add_argument("--wandb-entity", default=None, help="default: $WANDB_ENTITY")
    group.add_argument(
        "--wandb-dir",
        type=Path,
        default=None,
        help="where offline runs land (default: $WANDB_DIR, else the cell directory)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage text is one --help away)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zsharp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"zsharp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    download = commands.add_parser(
        "download",
        help="fetch and prepare a dataset",
        description="Fetch a dataset, verify its md5, prepare it as uint8 arrays under "
        "ROOT/NAME/ (READY is written last). A root that already holds it uses no network.",
    )
    download.add_argument("name", choices=list(DATASETS))
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
    _add_data_and_device_arguments(run)
    run.add_argument("--checkpoint", type=Path, default=None, help="default: <out>/checkpoint.pt")
    run.add_argument(
        "--compile",
        action="store_true",
        default=_env_flag("ZSHARP_COMPILE"),
        help="torch.compile the model (default: $ZSHARP_COMPILE)",
    )
    run.add_argument(
        "--graphs",
        action="store_true",
        default=_env_flag("ZSHARP_GRAPHS"),
        help="capture the whole training step as CUDA graphs and replay them (small "
        "models; fused base optimizer; not with fp16, --compile, dropout or --processes; "
        "uncaptured on a CPU; default: $ZSHARP_GRAPHS)",
    )
    run.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    run.add_argument(
        "--processes",
        type=_processes,
        default=_processes(os.environ.get("ZSHARP_PROCESSES") or "1"),
        metavar="N",
        help="run the cell data-parallel on N processes through torchrun (N GPUs, or CPU "
        "processes with gloo; the global batch stays --batch-size; default "
        "$ZSHARP_PROCESSES or 1). Under torchrun or srun yourself, leave it at 1",
    )
    run.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto")
    run.add_argument(
        "--record-failure",
        action="store_true",
        help="on a failure that would recur (a non-finite loss, a configuration that cannot "
        "be built) write a summary with status 'failed' and exit 0, so a workflow can "
        "tabulate it (used by the Snakemake rules); a transient fault (I/O, out of memory, "
        "…) fails the job, and on the last attempt (see --attempt) writes one marked "
        "transient, which the table shows as missing and the workflow retries next run",
    )
    run.add_argument(
        "--attempt",
        type=int,
        nargs=2,
        metavar=("N", "OF"),
        default=None,
        help="this is attempt N of OF (with --record-failure): transient faults are "
        "written down only on the last attempt; earlier ones fail, so the scheduler "
        "retries them",
    )
    run.add_argument(
        "--label", default=None, help="the grid's optimizer entry (default: the optimizer)"
    )
    run.add_argument("--key", default=None, help="the cell's key in its grid, for the summary")
    run.add_argument(
        "--matched",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="a matched control's record for the summary: the entry whose perturbation norm "
        "this cell's rho equals, the norm, rho (the workflow passes it)",
    )
    _add_wandb_arguments(train, named=True)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a trained cell",
        description="Test accuracy and loss, expected calibration error (equal-width "
        "confidence bins) and sharpness: the dominant eigenvalue of the Hessian of the "
        "training loss, by power iteration with Hessian-vector products on a fixed subset of "
        "the training split (BatchNorm in eval mode). Writes CELL/eval.json.",
    )
    evaluate.add_argument("--cell", type=Path, required=True, help="a trained cell directory")
    _add_data_and_device_arguments(evaluate)
    options = evaluate.add_argument_group("evaluation")
    for arg in EVALUATE:
        _flag(options, arg, default=arg.default)
    _add_wandb_arguments(evaluate, named=True)

    aggregate = commands.add_parser(
        "aggregate",
        help="tabulate and plot finished cells",
        description="Tables (mean ± std over seeds), a paired comparison and plots from cell "
        "directories. Each cell is named by the grid entry its summary records, else by its "
        "optimizer.",
    )
    aggregate.add_argument("cells", nargs="+", type=Path, help="cell directories")
    aggregate.add_argument("--out", type=Path, required=True)
    aggregate.add_argument(
        "--baseline", default=None, help="the entry compared against (default: sam)"
    )
    aggregate.add_argument(
        "--candidates",
        nargs="*",
        default=None,
        help="entries compared with the baseline (default: every ZSharp entry)",
    )
    aggregate.add_argument(
        "--grid",
        default=None,
        help="the workflow config (a YAML/JSON file, or JSON text): adds the sensitivity "
        "plots of its swept entries, its published results, and its comparison when "
        "--baseline and --candidates are not given",
    )
    aggregate.add_argument("--experiment", default="zsharp", help="the W&B group")
    _add_wandb_arguments(aggregate)

    commands.add_parser(
        "schema",
        help="print the workflow config's JSON Schema",
        description="The JSON Schema a workflow config is validated against, with every "
        "dataset, model, optimizer and setting the registries know (plugins included).",
    )
    commands.add_parser(
        "snakefile",
        help="print the path of the workflow's Snakefile",
        description="Where the Snakefile of this installation is: snakemake -s "
        '"$(zsharp snakefile)" --cores all runs the workflow from any folder.',
    )
    return parser


def _config_document(text: str | None) -> dict[str, Any]:
    """``--config``: a JSON document, or a JSON/YAML file holding one."""
    if text is None:
        return {}
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--config: not valid JSON: {error}") from None
    path = Path(text)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the cell configuration: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: must hold a mapping of settings")
    if isinstance(document.get("config"), dict):  # a cell's summary.json: its configuration
        return dict(document["config"])
    return document


def cell_document(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration document of ``zsharp train``: ``--config``, then the flags given."""
    document = _config_document(args.config_doc)
    for key in (*CELL_KEYS, *(a.name for a in SETTINGS)):
        if getattr(args, key) is not None:
            document[key] = getattr(args, key)
    for key in _MAPPING_FIELDS:
        if getattr(args, key):
            document[key] = {**document.get(key, {}), **dict(getattr(args, key))}
    return document


def cell_from_arguments(args: argparse.Namespace) -> Any:
    """The CellConfig of ``zsharp train``: ``--config``, then the flags given."""
    return from_dict(cell_document(args), deep=True)


def _train(args: argparse.Namespace) -> int:
    from zsharp.data import DatasetError
    from zsharp.pipeline.cell.distributed import World, launch, launched_rank, timeout_seconds
    from zsharp.pipeline.cell.folder import SUMMARY, CellError, claim
    from zsharp.pipeline.cell.tracking import resolve_mode, resolve_timeout
    from zsharp.pipeline.cell.train import record_failure, train_cell
    from zsharp.pipeline.cell.trainer import NonFiniteLossError, PreemptedError

    document = cell_document(args)
    # the registries' rules: bad input fails here, before any folder is touched
    cfg = from_dict(document, deep=False)
    rt = Runtime(
        out=args.out,
        data_root=args.data_root,
        checkpoint=args.checkpoint,
        device=args.device,
        compile=args.compile,
        graphs=args.graphs,
        threads=args.threads,
        progress=args.progress,
        wandb_mode=args.wandb_mode,
        wandb_project=args.wandb_project,
        wandb_entity=args.wandb_entity,
        wandb_dir=args.wandb_dir,
        wandb_name=args.wandb_name,
        label=args.label,
        key=args.key,
        matched=args.matched,
    )
    rt.validate()
    resolve_mode(rt.wandb_mode), resolve_timeout()
    world = World.from_environ()
    if args.processes > 1 and world.distributed and not launched_rank():
        raise ConfigError(
            f"processes: {args.processes} (--processes or $ZSHARP_PROCESSES) asked of a process "
            "torchrun or srun already started; leave it at 1 there"
        )
    if args.processes > 1 and not world.distributed:
        if rt.graphs:
            raise ConfigError("graphs: not with --processes > 1 (one process per cell only)")
        timeout_seconds()  # a bad $ZSHARP_DDP_TIMEOUT fails here, before any process starts
        _check_world(cfg, rt, args.processes)
        # the ranks run the same command line: each sees it was launched (launched_rank)
        return launch(args.processes, sys.argv[1:] if args.argv is None else args.argv)
    owned = claim(args.out) if world.main else contextlib.nullcontext()
    with owned:  # one process per cell; refuses /, ~, a folder that is no cell
        try:
            # what only building tells (a timm name, a model option): a property of the
            # configuration, recorded like a divergence
            cfg = from_dict(document, deep=True)
            summary = train_cell(cfg, rt, world)
        except (PreemptedError, DatasetError, CellError, KeyboardInterrupt):
            raise
        except Exception as error:
            recurs = isinstance(error, (NonFiniteLossError, ConfigError))
            final_attempt = args.attempt is None or args.attempt[0] >= args.attempt[1]
            if not args.record_failure or not (recurs or final_attempt) or not world.main:
                raise
            record_failure(cfg, rt, error, transient=not recurs)
            what = "a failure" if recurs else "a transient fault (the workflow retries it)"
            print(
                f"zsharp train: recorded {what} in {args.out / SUMMARY}: "
                + " ".join(str(error).split()),
                file=sys.stderr,
            )
            return 0
    if not world.main:
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


def check_summary(cell: Path) -> dict[str, Any]:
    """A cell's summary.json, or a :class:`ConfigError` naming it: absent, unreadable, not
    JSON, or recording no valid configuration."""
    from zsharp.pipeline.cell.folder import SUMMARY, RecordError, read_summary

    try:
        summary = read_summary(cell)
    except RecordError as error:
        raise ConfigError(f"{error}; train the cell (again)") from None
    if summary.get("status") == "ok":
        try:
            from_dict(summary["config"])
        except ConfigError as error:
            raise ConfigError(f"{cell / SUMMARY}: config.{error}") from None
    return summary


def _evaluate(args: argparse.Namespace) -> int:
    from zsharp.pipeline.cell.evaluate import EvalOptions, evaluate_cell
    from zsharp.pipeline.cell.folder import claim

    check_summary(args.cell)
    with claim(args.cell, "zsharp evaluate", check=False):  # not while a retrain runs
        result = evaluate_cell(
            args.cell,
            EvalOptions(
                data_root=args.data_root,
                device=args.device,
                **{arg.name: getattr(args, arg.name) for arg in EVALUATE},
                wandb_mode=args.wandb_mode,
                wandb_project=args.wandb_project,
                wandb_entity=args.wandb_entity,
                wandb_dir=args.wandb_dir,
                wandb_name=args.wandb_name,
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


def _grid_document(text: str) -> dict[str, Any]:
    """``aggregate --grid``: a workflow config as JSON text, or a YAML/JSON file."""
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--grid: not valid JSON: {error}") from None
    else:
        try:
            document = yaml.safe_load(Path(text).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"--grid: cannot read the workflow config {text}: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"--grid: {text[:60]} does not hold a mapping (a workflow config)")
    return document


def _log_plots(tracker: Any, paths: Sequence[Path]) -> None:
    """The sensitivity plots as images of the aggregate's W&B run (no-op when disabled)."""
    if tracker.run is None or not paths:
        return
    try:
        import wandb

        tracker.run.log({f"sensitivity/{path.stem}": wandb.Image(str(path)) for path in paths})
    except Exception as error:  # as Tracker: a W&B failure is one warning, not a crash
        tracker._failed("logging the sensitivity plots", error)


def _aggregate(args: argparse.Namespace) -> int:
    from zsharp.pipeline.aggregate import aggregate
    from zsharp.pipeline.cell.tracking import Tracker
    from zsharp.pipeline.grid.expand import load_grid
    from zsharp.pipeline.grid.schema import GridError

    missing = [str(c) for c in args.cells if not c.is_dir()]
    if missing:
        raise FileNotFoundError(f"not a cell directory: {missing[0]}")
    grid = None
    if args.grid is not None:
        try:
            grid = load_grid(_grid_document(args.grid), cells=False)
        except GridError as error:
            raise ConfigError(f"--grid: {error}") from None
    frames = aggregate(args.cells, args.out, args.baseline, args.candidates, grid=grid)
    candidates = list(frames["comparison"]["candidate"].unique())
    tracker = Tracker(
        mode=args.wandb_mode,
        project=args.wandb_project,
        entity=args.wandb_entity,
        directory=args.wandb_dir or args.out,
        group=args.experiment,
        name="aggregate",
        job_type="aggregate",
        config={"baseline": args.baseline, "candidates": candidates, "cells": len(args.cells)},
    )
    for key in ("table", "comparison", "published", "sensitivity"):
        if key in ("published", "sensitivity") and frames[key].empty:
            continue
        frame = frames[key].astype(object).where(frames[key].notna(), None)
        tracker.log_table(key, list(frame.columns), frame.to_numpy().tolist())
    _log_plots(tracker, list(frames["sensitivity_plots"]))
    tracker.finish()
    table = frames["table"]
    print(
        f"{args.out}: {len(table)} cells, {int(table['failed'].sum())} failed seeds, "
        f"{int(table['missing'].sum())} missing"
    )
    return 0


def _schema(args: argparse.Namespace) -> int:
    from zsharp.pipeline.grid.schema import schema

    print(json.dumps(schema(), indent=2))
    return 0


def snakefile() -> Path:
    """The workflow's Snakefile: the copy an installation carries, else the repository's."""
    package = Path(__file__).resolve().parents[1]  # the zsharp package
    for candidate in (package / "_workflow" / "Snakefile", package.parent / "Snakefile"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("no Snakefile beside this installation of zsharp")


def _snakefile(args: argparse.Namespace) -> int:
    print(snakefile())
    return 0


COMMANDS = {
    "train": _train,
    "download": _download,
    "evaluate": _evaluate,
    "aggregate": _aggregate,
    "schema": _schema,
    "snakefile": _snakefile,
}


def _transient(error: BaseException) -> bool:
    """A fault that running the command again may not meet: I/O (a full disk, a flaky
    file system), memory (CUDA's OutOfMemoryError is a RuntimeError)."""
    return isinstance(error, (OSError, MemoryError)) or type(error).__name__ == "OutOfMemoryError"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (see the module docstring).

    One of several processes of a cell (under ``zsharp train --processes``) leaves its
    status for the launcher, which passes rank 0's on (torchrun does not).
    """
    from zsharp.pipeline.cell.distributed import World, announce, shutdown, write_status

    world = World.from_environ()
    announce(world)
    code = 1  # an uncaught exception
    try:
        code = _main(argv)
        return code
    finally:
        if world.distributed:
            write_status(world, code)
            shutdown()


def _check_world(cfg: Any, rt: Runtime, processes: int) -> None:
    """What would stop a data-parallel cell, refused before its processes start."""
    import torch

    from zsharp.pipeline.cell.runtime import load_data, select_device
    from zsharp.pipeline.cell.trainer import check_world

    device = select_device(rt.device)
    if device.type == "cuda" and torch.cuda.device_count() < processes:
        raise ConfigError(
            f"processes: {processes} processes need {processes} GPUs (one each), but "
            f"{torch.cuda.device_count()} are visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    check_world(cfg.validate(), processes, device.type, len(load_data(cfg, rt.data_root).train_y))


def _main(argv: Sequence[str] | None) -> int:
    from zsharp.atomic import BusyError
    from zsharp.data import DatasetError
    from zsharp.pipeline.cell.checkpoint import CorruptCheckpointError
    from zsharp.pipeline.cell.folder import CellError
    from zsharp.pipeline.cell.trainer import (
        EXIT_INTERRUPTED,
        EXIT_NONFINITE,
        NonFiniteLossError,
        PreemptedError,
    )

    try:
        load_plugins()
    except PluginError as error:
        print(f"zsharp: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = None if argv is None else list(argv)
    except SystemExit as exit_:  # --help, --version, or a one-line usage error
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    bad_input = (
        ConfigError, DatasetError, FileNotFoundError, CellError, BusyError, CorruptCheckpointError
    )  # fmt: skip
    try:
        return COMMANDS[args.command](args)
    except bad_input as error:
        _say(f"zsharp {args.command}: error: {_line(error)}")
        return EXIT_BAD_INPUT
    except PreemptedError as error:
        _say(f"zsharp {args.command}: {error}")
        return EXIT_INTERRUPTED
    except NonFiniteLossError as error:
        _say(f"zsharp {args.command}: error: {error}")
        return EXIT_NONFINITE
    except Exception as error:
        if not _transient(error):
            raise
        _say(
            f"zsharp {args.command}: error: {_line(error)} (a transient fault: nothing was "
            "recorded; fix it and run the same command again)"
        )
        return EXIT_TRANSIENT


def _say(message: str) -> None:
    """A command's one-line outcome on stderr; of a data-parallel cell's ranks, rank 0's only
    (they all reach the same outcome)."""
    from zsharp.pipeline.cell.distributed import World

    if World.from_environ().main:
        print(message, file=sys.stderr)


def _line(error: BaseException) -> str:
    """An error as one line; an OSError with its errno and file."""
    text = " ".join(str(error).split())
    if isinstance(error, MemoryError) and not text:
        text = "out of memory"
    return text or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
