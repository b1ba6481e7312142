"""What every slide reader backend is: :class:`Backend` (levels, MPP, vendor, properties and a region
reader of one opened file) and the helpers the backends share to turn their arrays and metadata into the
same RGB uint8 pixels and plausible resolutions. One backend per module beside it (cucim, tiffslide,
dicom, openslide); :mod:`.slide` picks one and wraps it in a :class:`~.slide.Slide`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from cellvit_optimus.engine.jsondoc import JsonDict

__all__ = ("Backend", "BackendName", "MPP_PLAUSIBLE", "flatten", "plausible_mpp", "rgb",
           "tiff_resolution_mpp", "to_float")

BackendName = Literal["auto", "cucim", "tiffslide", "dicom", "openslide"]

#: microscope resolutions outside this range (microns per pixel) are treated as missing metadata:
#: a 72 or 96 dpi default resolution tag (352.8 / 264.6 um/px) is not a scan resolution.
MPP_PLAUSIBLE = (0.05, 50.0)


class Backend:
    """One opened file as levels + a region reader; :class:`~.slide.Slide` does the clipping, checks
    and tiling."""

    name: str = "?"
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None = None
    vendor: str | None = None
    properties: JsonDict

    def read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """read an in-bounds region; (x, y) in level-0 pixels, (w, h) in level pixels"""
        raise NotImplementedError

    def read_many(self, locations: Sequence[tuple[int, int]], level: int, w: int, h: int) -> np.ndarray:
        return np.stack([self.read(x, y, level, w, h) for x, y in locations]) if locations else \
            np.empty((0, h, w, 3), np.uint8)

    def associated(self) -> dict[str, np.ndarray]:
        return {}

    def blank(self, x: int, y: int, level: int, w: int, h: int) -> bool:
        """whether an in-bounds region holds no stored pixels at all (sparse tiling), so that it reads
        as white without decoding anything; False where the backend cannot tell cheaply"""
        return False

    def row_bands(self, level: int) -> bool:
        """whether ``level`` is best read in full-width row bands (a stripped level: a square block would
        decode every strip it crosses in full)"""
        return False

    def close(self) -> None:
        pass

    def adopt_openslide_api(self, s: Any, prefix: str) -> JsonDict:
        """take levels, properties and MPP from a reader with OpenSlide's API (tiffslide, OpenSlide) whose
        properties hold ``<prefix>.mpp-x`` / ``<prefix>.mpp-y``; returns the properties"""
        self.level_dimensions = tuple((int(w), int(h)) for w, h in s.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in s.level_downsamples)
        props = dict(s.properties)
        self.properties = props
        mx = plausible_mpp(to_float(props.get(f"{prefix}.mpp-x")))
        my = plausible_mpp(to_float(props.get(f"{prefix}.mpp-y"))) or mx
        self.mpp = (mx, my) if mx else None
        return props


def rgb(a: np.ndarray) -> np.ndarray:
    """contiguous (h, w, 3) uint8 of a backend's grey / RGB / RGBA array"""
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.shape[-1] == 4:  # RGBA from slow paths: alpha carries no slide information
        a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.uint8)
    return np.ascontiguousarray(a)


def plausible_mpp(mpp: float | None) -> float | None:
    """``mpp`` when it is a microscope resolution (:data:`MPP_PLAUSIBLE`), else None (missing metadata)"""
    if mpp is None or not math.isfinite(mpp):
        return None
    return mpp if MPP_PLAUSIBLE[0] <= mpp <= MPP_PLAUSIBLE[1] else None


def tiff_resolution_mpp(unit: str | int | None, xres: float | None, yres: float | None):
    """microns per pixel from TIFF ResolutionUnit / X,YResolution (pixels per unit)"""
    if not xres or not yres:
        return None
    unit = str(unit).lower() if unit is not None else ""
    per_um = {"centimeter": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0, "resunit.centimeter": 1e4,
              "resunit.inch": 25400.0}.get(unit)
    if per_um is None:
        return None
    mx, my = plausible_mpp(per_um / xres), plausible_mpp(per_um / yres)
    return (mx, my) if mx and my else None


def to_float(v: Any) -> float | None:
    """``float(v)``, or None for a missing or malformed metadata value"""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def flatten(d: dict, prefix: str = "") -> JsonDict:
    """nested metadata dicts as one dict with dotted keys (``aperio.MPP``)"""
    out: JsonDict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
