"""Where a cell's training stands: the progress a checkpoint carries besides the weights,
the optimizer, the scheduler and the generators (:mod:`zsharp.pipeline.cell.resume`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# per-epoch means over the sharpness-aware steps (metrics.jsonl, W&B, the summary's final):
# ‖g‖ at w, ‖ε‖, the fraction of gradient entries the filter kept, cos∠(filtered, full
# ascent direction), the loss at w and at w + ε, and their difference (SAM's sharpness
# estimate; not the Hessian's top eigenvalue that `zsharp evaluate` calls sharpness)
DIAGNOSTICS = (
    "grad_norm",
    "epsilon_norm",
    "kept_fraction",
    "ascent_cosine",
    "loss_at_w",
    "loss_at_w_eps",
    "sam_sharpness",
)


@dataclass
class Progress:
    """The state of training that a checkpoint must carry besides model and optimizer."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed in the current epoch (mid-epoch checkpoints)
    records: list[dict[str, Any]] = field(default_factory=list)
    # running sums of the current epoch: loss·n, correct, n
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    epoch_train_seconds: float = 0.0
    epoch_lr: float | None = None  # the learning rate at the epoch's first step
    # the epoch's sums of DIAGNOSTICS and the count of sharpness-aware steps
    diagnostics: list[float] = field(default_factory=lambda: [0.0] * (len(DIAGNOSTICS) + 1))
    wandb_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a checkpoint stores them (plain containers)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Progress:
        """The progress a checkpoint stored; a KeyError, TypeError or ValueError if the
        file's fields do not fit (the caller sets such a file aside)."""
        values = {f.name: state[f.name] for f in dataclasses.fields(cls)}
        progress = cls(**values)
        progress.epoch, progress.batch = int(progress.epoch), int(progress.batch)
        progress.records = list(progress.records)
        progress.sums = [float(x) for x in progress.sums]
        progress.epoch_train_seconds = float(progress.epoch_train_seconds)
        progress.diagnostics = [float(x) for x in progress.diagnostics]
        if len(progress.sums) != 3 or len(progress.diagnostics) != len(DIAGNOSTICS) + 1:
            raise ValueError("the running sums have another length than this version's")
        return progress

    def next_epoch(self) -> None:
        """Start the next epoch: the running sums and the epoch's LR reset."""
        fresh = Progress()
        self.epoch, self.batch = self.epoch + 1, 0
        self.sums, self.diagnostics = fresh.sums, fresh.diagnostics
        self.epoch_train_seconds, self.epoch_lr = 0.0, None
