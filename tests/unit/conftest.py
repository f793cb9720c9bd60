"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _data_root() -> Path:
    """The real-data folder: ``$RAYLAB_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("RAYLAB_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """Root of the real datasets; skips the test when it is absent."""
    root = _data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set RAYLAB_DATA)")
    return root


@pytest.fixture(scope="session")
def real_jigsaws_root(real_data_root: Path) -> Path:
    """Root of the real JIGSAWS copy; skips the test when it is absent."""
    root = real_data_root / "jigsaws"
    if not root.is_dir():
        pytest.skip(f"real JIGSAWS data not found at {root}")
    return root
