"""Fixtures shared by the test modules (constants and helpers live in workflow_helpers)."""

from __future__ import annotations

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
    """``cli.run([ARGS], env=…, cwd=…, umask=…)``: ``python -m zsharp.cli ARGS`` as a fresh
    process forked from a server that imported torch once (see :class:`CommandServer`)."""
    server = CommandServer(tmp_path_factory.mktemp("cli"))
    yield server
    server.close()
