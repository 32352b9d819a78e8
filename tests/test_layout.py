"""The package's layout: the library apart from the pipeline, imports pointing one way.

Every ``import zsharp…`` of every module (those inside functions too) is read from the
source with ``ast``, and each module is placed in its layer (``zsharp/__init__.py`` says
why the layers are these): a module may import its own layer and the ones below, never one
above; the imports done at import time form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zsharp"

# layer of each part, lowest first; a module's part is the longest prefix listed
LAYERS = {
    "zsharp": 0,  # the package's own __init__ (its version) and zsharp.atomic
    "zsharp.atomic": 0,
    "zsharp.optim": 1,
    "zsharp.data": 2,
    "zsharp.models": 3,
    "zsharp.integrations": 4,
    "zsharp.pipeline": 5,  # its __init__
    "zsharp.pipeline.plugins": 5,
    "zsharp.pipeline.cell": 6,
    "zsharp.pipeline.grid": 7,
    "zsharp.pipeline.aggregate": 8,
    "zsharp.pipeline.docs": 9,
    "zsharp.pipeline.cli": 9,
    "zsharp.__main__": 10,
}
LIBRARY = ("zsharp.optim", "zsharp.data", "zsharp.models", "zsharp.integrations")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} is in no layer of LAYERS"
    return LAYERS[max(prefixes, key=len)]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported zsharp module, at import time?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from zsharp.x import y` may import the module zsharp.x.y
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found += [
            (name, id(node) in top_level)
            for name in names
            if name == "zsharp" or name.startswith("zsharp.")
        ]
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return [(name, eager) for name, eager in found if name in modules]


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_one_way(path: Path) -> None:
    me = module_name(path)
    for name, _ in imports(path):
        assert layer(name) <= layer(me), f"{me} (layer {layer(me)}) imports {name} ({layer(name)})"


def test_the_library_never_imports_the_pipeline() -> None:
    for path in SOURCES:
        me = module_name(path)
        if me.startswith(LIBRARY):
            outside = [n for n, _ in imports(path) if n.startswith("zsharp.pipeline")]
            assert not outside, f"{me} imports {outside}"


def test_no_import_cycle() -> None:
    """Depth-first search over the imports done at module level (TYPE_CHECKING ones are
    not: they are under an ``if`` and never run)."""
    graph = {module_name(p): {n for n, eager in imports(p) if eager} for p in SOURCES}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            pytest.fail("import cycle: " + " → ".join([*stack[stack.index(module) :], module]))
        if module in done:
            return
        for name in sorted(graph.get(module, ())):
            if name != module and not module.startswith(name + "."):  # a package's parent
                visit(name, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_each_layer_is_a_folder_that_exists() -> None:
    """The layers named here are the package's: a renamed part cannot slip through."""
    for name in LAYERS:
        path = PACKAGE.parent / Path(*name.split("."))
        assert path.is_dir() or path.with_suffix(".py").is_file(), name
