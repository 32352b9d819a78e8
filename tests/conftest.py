"""Fixtures shared by the test modules (constants and helpers live in workflow_helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zsharp.data import download_dataset


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the embedded digits, prepared once for the whole session."""
    root = tmp_path_factory.mktemp("data")
    download_dataset("digits", root)
    return root
