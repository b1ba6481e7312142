"""The tiffslide reader backend (pure Python TIFF / SVS / NDPI; what auto falls back to where cuCIM
cannot open or decode a file, and what it picks first for stripped TIFFs).

Stripped levels are read in row bands by :class:`~.strips.StripLevel` (bounded memory: tiffslide itself
decodes a whole strip for every region it touches); tiled levels go through tiffslide.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellvit_optimus.engine.errors import UnsupportedFormatError
from cellvit_optimus.engine.wsi.backend import Backend, rgb

__all__ = ("TiffSlideBackend",)

log = logging.getLogger(__name__)


class TiffSlideBackend(Backend):
    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._s = tiffslide.TiffSlide(str(path))
        props = self.adopt_openslide_api(self._s, "tiffslide")
        self.vendor = props.get("tiffslide.vendor") or "generic-tiff"
        self._lock = threading.Lock()
        try:
            self._strips = self._strip_levels(Path(path), props)
        except BaseException:
            self._s.close()
            raise

    def _strip_levels(self, path: Path, props: dict) -> dict:
        from cellvit_optimus.engine.wsi.strips import StripLevel, is_stripped

        if props.get("tiffslide.series-axes") not in ("YXS", "YX"):
            return {}
        series = self._s.ts_tifffile.series[int(props.get("tiffslide.series-index", 0))]
        out = {}
        for level in range(len(self.level_dimensions)):
            page = series.levels[level].keyframe
            if not is_stripped(page):
                continue
            try:
                out[level] = StripLevel(path, page)
            except UnsupportedFormatError as exc:  # a layout the band reader does not take: tiffslide's
                log.debug("%s", exc)
        return out

    def row_bands(self, level: int) -> bool:
        return level in self._strips

    def read(self, x, y, level, w, h):
        strips = self._strips.get(level)
        if strips is not None:
            ds = self.level_downsamples[level]
            return rgb(strips.read(int(x / ds), int(y / ds), w, h))
        return rgb(self._s.read_region((x, y), level, (w, h), as_array=True))

    def read_many(self, locations: Sequence[tuple[int, int]], level: int, w: int, h: int) -> np.ndarray:
        strips = self._strips.get(level)
        if strips is None or not locations:
            return super().read_many(locations, level, w, h)
        ds = self.level_downsamples[level]
        got = strips.read_many([(int(x / ds), int(y / ds)) for x, y in locations], w, h)
        return np.stack([rgb(a) for a in got]) if got.shape[-1] != 3 else got

    def associated(self):
        out = {}
        for name, img in self._s.associated_images.items():
            try:
                out[name] = rgb(np.asarray(img.convert("RGB")))
            except Exception as exc:
                log.warning("cannot read associated image %r: %s", name, exc)
        return out

    def close(self):
        for s in self._strips.values():
            s.close()
        self._s.close()
