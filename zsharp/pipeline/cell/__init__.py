"""One cell: a dataset × model × optimizer × seed, trained and evaluated in its folder.

``config`` (what the cell computes: :class:`~zsharp.pipeline.cell.config.CellConfig`, and
how it runs: ``Runtime``), ``folder`` (its files, ownership and records), ``runtime``
(device, precision, data, model), ``schedule`` (the LR), ``trainer`` (the trainer: its
step and epoch), ``progress`` and ``resume`` (what a checkpoint holds and how a run
continues), ``checkpoint`` (atomic, validated checkpoint files and generator states),
``train`` (the run: folder, W&B, summary), ``evaluate`` and ``metrics`` (test metrics, ECE,
Hessian sharpness), ``tracking`` (W&B that never stops training), ``distributed`` (a cell
on several processes).
"""
