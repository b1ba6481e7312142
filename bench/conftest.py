"""Benchmarks share the test fixtures (real data paths, devices) and the test-only reference code."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import (  # noqa: E402,F401  (re-exported fixtures)
    NUCLEI,
    SHARED,
    SLIDES,
    nuclei_dir,
    pytest_collection_modifyitems,
    shared_data,
    slides_dir,
    test_device,
)
