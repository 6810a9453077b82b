"""Shared test fixtures: the project root on sys.path and the real coco128 copy when it is present."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COCO128 = ROOT.parent / "shared" / "datasets" / "coco128"


@pytest.fixture(scope="session")
def coco128() -> Path:
    """Path of the real coco128 dataset; these tests need it and fail loudly without it."""
    assert (COCO128 / "images" / "train2017").is_dir(), f"coco128 not found at {COCO128}"
    return COCO128
