"""Build hook: ship the workflow inside the package (everything else is in pyproject.toml).

A wheel gets ``zsharp/_workflow/`` with the repository's Snakefile, ``workflow/`` and
``config/``, so an installed zsharp can run its own workflow (``zsharp snakefile`` prints
the path). An editable install needs no copy: ``zsharp snakefile`` finds the repository's.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PIPELINE = ("Snakefile", "workflow", "config")


class BuildWithPipeline(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        root = Path(__file__).resolve().parent
        target = Path(self.build_lib) / "zsharp" / "_workflow"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in PIPELINE:
            source = root / name
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildWithPipeline})
