"""Fixtures shared by the test modules (constants and helpers live in workflow_helpers)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.workflow_helpers import CommandServer
from zsharp.data import download_dataset


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the embedded digits, prepared once for the whole session."""
    root = tmp_path_factory.mktemp("data")
    download_dataset("digits", root)
    return root


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CommandServer]:
    """``cli.run([ARGS], env=…, cwd=…, umask=…)``: ``python -m zsharp ARGS`` as a fresh
    process forked from a server that imported torch once (see :class:`CommandServer`)."""
    server = CommandServer(tmp_path_factory.mktemp("cli"))
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each test leaves os.environ as it found it: an in-process W&B run, for one, leaves its
    service's address there, and a later test's subprocesses (snakemake jobs) would attach
    to that service and write their runs late."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
