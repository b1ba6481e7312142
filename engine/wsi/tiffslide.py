"""The tiffslide reader backend (pure Python TIFF / SVS / NDPI; what auto falls back to where cuCIM cannot open a file)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from cellvit_optimus.engine.wsi.backend import Backend, plausible_mpp, rgb, to_float

__all__ = ("TiffSlideBackend",)

log = logging.getLogger(__name__)


class TiffSlideBackend(Backend):
    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._s = tiffslide.TiffSlide(str(path))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._s.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._s.level_downsamples)
        props = dict(self._s.properties)
        self.properties = props
        self.vendor = props.get("tiffslide.vendor") or "generic-tiff"
        mx = plausible_mpp(to_float(props.get("tiffslide.mpp-x")))
        my = plausible_mpp(to_float(props.get("tiffslide.mpp-y"))) or mx
        self.mpp = (mx, my) if mx else None
        self._lock = threading.Lock()

    def read(self, x, y, level, w, h):
        return rgb(self._s.read_region((x, y), level, (w, h), as_array=True))

    def associated(self):
        out = {}
        for name, img in self._s.associated_images.items():
            try:
                out[name] = rgb(np.asarray(img.convert("RGB")))
            except Exception as exc:
                log.warning("cannot read associated image %r: %s", name, exc)
        return out

    def close(self):
        self._s.close()
