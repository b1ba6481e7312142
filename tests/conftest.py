"""Shared fixtures: where the real data lives, and device selection (CPU unless OPTIMUS_TEST_DEVICE says)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (the README's test command: 2 workers on CI's 2 cores) each worker, and every process
# it starts, gets one OpenMP/BLAS thread unless told otherwise: two workers with torch's default of one
# thread per core would put four busy threads on two cores. Set here, before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPTIMUS_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDES = SHARED / "slides"
NUCLEI = SHARED / "nuclei"

# test-only helpers (e.g. the scipy/skimage HoVer-Net reference) live beside the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tests either
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"real test data not found at {SHARED} (set OPTIMUS_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture(scope="session")
def nuclei_dir(shared_data: Path) -> Path:
    return shared_data / "nuclei"


@pytest.fixture(scope="session")
def test_device() -> str:
    return os.environ.get("OPTIMUS_TEST_DEVICE", "cpu")
