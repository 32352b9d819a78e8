"""Third-party optimizers, models and datasets: modules that register them on import.

A plugin is a module that calls ``register_optimizer``, ``register_model`` or
``register_dataset`` when imported. The command line and the workflow import every module
named in ``$ZSHARP_PLUGINS`` (comma-separated) and every entry point of the
``zsharp.pipeline.plugins`` group before they read a config, so a grid can name what a plugin adds.
"""

from __future__ import annotations

import functools
import importlib
import os
from importlib.metadata import entry_points

ENVIRONMENT = "ZSHARP_PLUGINS"
GROUP = "zsharp.plugins"


class PluginError(ImportError):
    """A plugin named in the environment or an entry point cannot be imported."""


@functools.cache
def load_plugins() -> tuple[str, ...]:
    """Import every plugin once; return their module names."""
    names = [n.strip() for n in os.environ.get(ENVIRONMENT, "").split(",") if n.strip()]
    names += [point.value for point in entry_points(group=GROUP)]
    for name in names:
        try:
            importlib.import_module(name.partition(":")[0])
        except ImportError as error:
            raise PluginError(f"{ENVIRONMENT}: cannot import plugin {name!r}: {error}") from None
    return tuple(names)
