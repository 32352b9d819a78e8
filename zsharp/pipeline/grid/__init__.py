"""The grid of a workflow config: its schema, its cells, its published results, and the
device slots its jobs take on a GPU box.

``schema`` (the JSON Schema, filled from the registries, and one-line errors), ``expand``
(the cells, sweeps and comparison of a config), ``published`` (published results a config
puts beside ours), ``devices`` (``zsharp-device``: GPUs for concurrent jobs).
"""
