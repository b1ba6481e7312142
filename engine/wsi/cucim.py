"""The cuCIM reader backend (GPU-capable, batched reads on cuCIM's own decoder threads)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cellvit_optimus.engine.wsi.backend import Backend, flatten, plausible_mpp, rgb, tiff_resolution_mpp

__all__ = ("CuCIMBackend",)

log = logging.getLogger(__name__)


class CuCIMBackend(Backend):
    name = "cucim"

    def __init__(self, path: Path, num_workers: int) -> None:
        from cucim import CuImage  # heavy, optional

        self._img = CuImage(str(path))
        res = self._img.resolutions
        self.level_dimensions = tuple((int(w), int(h)) for w, h in res["level_dimensions"])
        self.level_downsamples = tuple(float(d) for d in res["level_downsamples"])
        self._num_workers = num_workers
        meta = self._img.metadata
        self.properties = flatten(meta)
        aperio = meta.get("aperio", {}) or {}
        mpp = None
        if aperio.get("MPP"):
            m = plausible_mpp(float(aperio["MPP"]))
            mpp = (m, m) if m else None
            self.vendor = "aperio"
        elif "aperio" in meta:
            self.vendor = "aperio"
        if mpp is None:
            tiff = meta.get("tiff", {}) or {}
            mpp = tiff_resolution_mpp(tiff.get("resolution_unit"), tiff.get("x_resolution"),
                                       tiff.get("y_resolution"))
            if self.vendor is None and "tiff" in meta:
                self.vendor = "generic-tiff"
        self.mpp = mpp
        self._batched = True

    def read(self, x, y, level, w, h):
        return rgb(self._img.read_region((x, y), (w, h), level))

    def read_many(self, locations, level, w, h):
        if not locations:
            return np.empty((0, h, w, 3), np.uint8)
        if len(locations) == 1 or not self._batched:
            return np.stack([self.read(x, y, level, w, h) for x, y in locations])
        out = []
        try:
            # cuCIM decodes the batch on its own worker threads (the GIL is released inside)
            it = self._img.read_region([tuple(map(int, loc)) for loc in locations], (w, h), level,
                                       num_workers=self._num_workers, batch_size=len(locations))
            for batch in it:
                arr = np.asarray(batch)
                out.append(rgb(arr.reshape(-1, h, w, arr.shape[-1])))
        except RuntimeError as exc:
            # images cuCIM loads on its "slow path" (e.g. RGBA strips) have no batched reader
            log.debug("cuCIM batched read unavailable (%s); reading tile by tile", exc)
            self._batched = False
            return self.read_many(locations, level, w, h)
        return np.ascontiguousarray(np.concatenate(out, axis=0))

    def associated(self):
        out = {}
        for name in sorted(self._img.associated_images):
            try:
                out[name] = rgb(self._img.associated_image(name))
            except Exception as exc:  # an unreadable label must not make the slide unusable
                log.warning("cannot read associated image %r: %s", name, exc)
        return out

    def close(self):
        self._img.close()
