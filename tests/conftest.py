"""Shared pytest fixtures: where the real data lives, and environment for Airflow-free tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("RPP_REAL_DATA", REPO.parent / "shared" / "data" / "real"))

os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("RPP_CONFIG_DIR", str(REPO / "config"))
# the default data folders (incoming, work, products, master library) of a test that does not set
# its own: a fresh folder, never the repository's data/ (a bench's masters there were picked up)
os.environ.setdefault("RPP_DATA_ROOT", tempfile.mkdtemp(prefix="rpp-tests-data-"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Folder of real FITS files and recorded catalogue responses (``../shared/data/real``).

    Skips the test with a clear reason on a fresh clone where the shared data is absent.
    Set ``RPP_REAL_DATA`` to point elsewhere.
    """
    if not (REAL_DATA / "SOURCES.md").is_file():
        pytest.skip(
            f"real test data not found at {REAL_DATA} (set RPP_REAL_DATA); see README 'Test data'"
        )
    return REAL_DATA
