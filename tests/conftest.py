"""Shared test fixtures. Real data comes from ../shared/data (beside the clone), read at run time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POCKETLM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.fail(f"real data not found at {SHARED_DATA}: put the shared data folder beside the clone "
                    "or set POCKETLM_SHARED_DATA")
    return SHARED_DATA
