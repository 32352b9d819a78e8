"""The reproduction pipeline: cells, the grid of cells, its aggregate, and the command line.

:mod:`~zsharp.pipeline.cell` trains and evaluates one dataset × model × optimizer × seed
cell in a folder of its own; :mod:`~zsharp.pipeline.grid` validates a workflow config and
expands it into cells; :mod:`~zsharp.pipeline.aggregate` turns finished cells into tables
and plots; :mod:`~zsharp.pipeline.cli` is the ``zsharp`` command each Snakemake rule calls,
one job per command. Everything here is built on the library (``zsharp.optim``,
``zsharp.models``, ``zsharp.data``), never the other way round.
"""
