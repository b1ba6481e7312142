"""The OpenSlide reader backend (the formats only OpenSlide reads: MIRAX, VMS, ...)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cellvit_optimus.engine.wsi.backend import Backend, plausible_mpp, rgb, to_float

__all__ = ("OpenSlideBackend",)

log = logging.getLogger(__name__)


class OpenSlideBackend(Backend):
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self._s = openslide.OpenSlide(str(path))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._s.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._s.level_downsamples)
        props = dict(self._s.properties)
        self.properties = props
        self.vendor = props.get("openslide.vendor")
        mx = plausible_mpp(to_float(props.get("openslide.mpp-x")))
        my = plausible_mpp(to_float(props.get("openslide.mpp-y"))) or mx
        self.mpp = (mx, my) if mx else None

    def read(self, x, y, level, w, h):
        return rgb(np.asarray(self._s.read_region((x, y), level, (w, h)).convert("RGB")))

    def associated(self):
        return {k: rgb(np.asarray(v.convert("RGB"))) for k, v in self._s.associated_images.items()}

    def close(self):
        self._s.close()
