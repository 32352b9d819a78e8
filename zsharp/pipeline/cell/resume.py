"""A cell's checkpoint: what it holds, and how a run continues from it.

The checkpoint is everything that decides the rest of the run: the weights, the optimizer,
the scheduler, the GradScaler, every random generator (every rank's), the
:class:`~zsharp.pipeline.cell.progress.Progress` and the configuration's digest. Written
atomically after every epoch and at a stop signal (:mod:`zsharp.pipeline.cell.checkpoint`),
so a run killed at any moment and started again continues bit for bit. A checkpoint that
cannot be read or does not fit is set aside (``checkpoint.pt.corrupt-<time>``) and the run
starts afresh, as if it had never existed.
"""

from __future__ import annotations

import copy
import sys
from typing import TYPE_CHECKING, Any

from zsharp.pipeline.cell import checkpoint, distributed
from zsharp.pipeline.cell.progress import Progress

if TYPE_CHECKING:
    from zsharp.pipeline.cell.trainer import CellTrainer

CHECKPOINT_FORMAT = 1


def state(trainer: CellTrainer) -> dict[str, Any]:
    """The checkpoint's contents (every rank calls it: the generators are gathered)."""
    world = trainer.world
    return {
        "format": CHECKPOINT_FORMAT,
        "config_digest": trainer.cfg.digest(),
        "config": trainer.cfg.to_dict(),
        **trainer.progress.to_dict(),
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": None if trainer.scaler is None else trainer.scaler.state_dict(),
        "rng": checkpoint.rng_state(),
        "world_size": world.size,
        # every rank's generators (dropout draws differ between ranks)
        "rng_ranks": distributed.gather(checkpoint.rng_state()) if world.distributed else None,
    }


def save(trainer: CellTrainer) -> None:
    """Rank 0 writes the checkpoint (every rank calls it: the generators are gathered)."""
    contents = state(trainer)
    if trainer.world.main:
        checkpoint.save(trainer.rt.checkpoint_path, contents)


def try_resume(trainer: CellTrainer) -> bool:
    """Load the checkpoint if there is one for this configuration.

    A checkpoint that cannot be read or loaded (truncated by a full or flaky disk,
    overwritten, not a checkpoint) is renamed aside with one warning naming it, and
    training starts afresh, exactly as if it had never existed: whatever it had already
    changed (weights, optimizer, generators) is put back first.
    """
    if not trainer.world.distributed:
        return _load(trainer, _read(trainer))
    # rank 0 reads (and sets aside a bad file); every rank applies what it read
    box = [_read(trainer, map_location="cpu") if trainer.world.main else None]
    import torch.distributed as dist

    dist.broadcast_object_list(box, src=0)
    return _load(trainer, box[0])


def _set_aside(trainer: CellTrainer, reason: str) -> None:
    path = trainer.rt.checkpoint_path
    if not trainer.world.main:
        return
    aside = checkpoint.set_aside(path)
    print(
        f"zsharp: warning: {path}: unusable checkpoint set aside as {aside.name} "
        f"({' '.join(reason.split())[:300]}); training starts afresh",
        file=sys.stderr,
        flush=True,
    )


def _read(trainer: CellTrainer, map_location: Any = None) -> dict[str, Any] | None:
    """The checkpoint of this configuration, or None (absent, unusable: set aside)."""
    path = trainer.rt.checkpoint_path
    if not path.exists():
        return None
    try:
        contents = checkpoint.load(path, map_location=map_location or trainer.device)
    except checkpoint.CorruptCheckpointError as error:
        _set_aside(trainer, str(error).removeprefix(f"{path}: "))
        return None
    if not isinstance(contents, dict):
        _set_aside(trainer, f"holds a {type(contents).__name__}, not a checkpoint")
        return None
    if (
        contents.get("format") != CHECKPOINT_FORMAT
        or contents.get("config_digest") != trainer.cfg.digest()
    ):
        print(f"ignoring {path}: it belongs to another configuration", file=sys.stderr)
        return None
    written_by, size = contents.get("world_size", 1), trainer.world.size
    if written_by != size:
        print(
            f"ignoring {path}: it was written by {written_by} processes, this run has {size} "
            f"(run with --processes {written_by} to continue from epoch "
            f"{contents.get('epoch', 0) + 1})",
            file=sys.stderr,
        )
        return None
    return contents


def _load(trainer: CellTrainer, contents: dict[str, Any] | None) -> bool:
    """Load a checkpoint's contents; one that does not fit is set aside (False)."""
    if contents is None:
        return False
    fresh = {
        "model": {
            k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()
        },
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
        "scaler": None if trainer.scaler is None else copy.deepcopy(trainer.scaler.state_dict()),
        "rng": checkpoint.rng_state(),
    }
    try:
        trainer.model.load_state_dict(contents["model"])
        trainer.optimizer.load_state_dict(contents["optimizer"])
        trainer.scheduler.load_state_dict(contents["scheduler"])
        if trainer.scaler is not None and contents["scaler"] is not None:
            trainer.scaler.load_state_dict(contents["scaler"])
        ranks = contents.get("rng_ranks")
        checkpoint.set_rng_state(ranks[trainer.world.rank] if ranks else contents["rng"])
        progress = Progress.from_dict(contents)
    except Exception as error:  # a well-formed file whose contents do not fit
        trainer.model.load_state_dict(fresh["model"])
        trainer.optimizer.load_state_dict(fresh["optimizer"])
        trainer.scheduler.load_state_dict(fresh["scheduler"])
        if trainer.scaler is not None:
            trainer.scaler.load_state_dict(fresh["scaler"])
        checkpoint.set_rng_state(fresh["rng"])
        _set_aside(trainer, f"{type(error).__name__}: {error}")
        return False
    if not trainer.world.main:  # the running sums are rank 0's (the ranks' total)
        progress.sums = [0.0] * len(progress.sums)
        progress.diagnostics = [0.0] * len(progress.diagnostics)
    trainer.progress = progress
    return True
