"""The OpenSlide reader backend (the formats only OpenSlide reads: MIRAX, VMS, ...)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cellvit_optimus.engine.wsi.backend import Backend, rgb

__all__ = ("OpenSlideBackend",)

log = logging.getLogger(__name__)


class OpenSlideBackend(Backend):
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self._s = openslide.OpenSlide(str(path))
        props = self.adopt_openslide_api(self._s, "openslide")
        self.vendor = props.get("openslide.vendor")

    def read(self, x, y, level, w, h):
        return rgb(np.asarray(self._s.read_region((x, y), level, (w, h)).convert("RGB")))

    def associated(self):
        return {k: rgb(np.asarray(v.convert("RGB"))) for k, v in self._s.associated_images.items()}

    def close(self):
        self._s.close()
