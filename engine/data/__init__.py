"""Data shipped inside the package: the bundled real slide, the default nuclei model and its safety
states (OOD reference ``default_ood.npz``, nucleus-type calibration ``default_nuclei_conformal.json``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ("bundled_slide", "default_nuclei_model", "DATA_DIR")

DATA_DIR = Path(__file__).resolve().parent


def bundled_slide() -> Path:
    """path of the bundled real slide (OpenSlide's CMU-1-Small-Region, Aperio SVS; see README.md here)"""
    return DATA_DIR / "cmu_small_region.svs"


def default_nuclei_model() -> Path:
    """path of the bundled default nuclei checkpoint (tiny backbone + UNETR, CoNSeP profile; README.md here)"""
    return DATA_DIR / "default_nuclei.safetensors"
