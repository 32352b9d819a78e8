"""zsharp: ZSharp and the SAM family for PyTorch, and a pipeline that reproduces the paper.

The package is two things, and its layout says which is which:

* **the library** — usable in any training loop, importable without the pipeline:
  :mod:`zsharp.optim` (the optimizers, their registry, the one sharpness-aware step
  ``zsharp.optim.step`` and its CUDA graph ``zsharp.optim.graphs``; PyTorch only),
  :mod:`zsharp.models` (CIFAR ResNets, VGG-BN, the paper's ViT, WRN, timm),
  :mod:`zsharp.data` (datasets prepared on disk, the device-resident loader) and
  :mod:`zsharp.integrations` (Lightning, Hugging Face);
* **the pipeline** — :mod:`zsharp.pipeline`: one cell (``pipeline.cell``: its
  configuration, training loop, resume, evaluation, checkpoints, W&B, processes), the grid
  of cells (``pipeline.grid``: schema, expansion, published results, device slots), the
  aggregate of a grid (``pipeline.aggregate``: reading, statistics, tables, plots) and the
  command line (``pipeline.cli``, also ``python -m zsharp``) the Snakemake rules call.

Imports point one way: library ← pipeline.cell ← pipeline.grid ← pipeline.aggregate ←
pipeline.cli ← the workflow's rules (``tests/test_layout.py`` checks it). ``zsharp.atomic``
(atomic files and directory locks) serves both the library's data and the pipeline.
"""

__version__ = "0.1.0"
