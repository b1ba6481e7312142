"""Data shipped inside the package: the bundled real slide (and, later, the default model weights)."""

from __future__ import annotations

from pathlib import Path

__all__ = ("bundled_slide", "DATA_DIR")

DATA_DIR = Path(__file__).resolve().parent


def bundled_slide() -> Path:
    """path of the bundled real slide (OpenSlide's CMU-1-Small-Region, Aperio SVS; see README.md here)"""
    return DATA_DIR / "cmu_small_region.svs"
