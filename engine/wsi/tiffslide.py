"""The tiffslide reader backend (pure Python TIFF / SVS / NDPI; what auto falls back to where cuCIM
cannot open a file)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

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
