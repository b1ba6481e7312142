"""The cuCIM reader backend (GPU-capable, batched reads on cuCIM's own decoder threads)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.wsi.backend import Backend, flatten, plausible_mpp, rgb, tiff_resolution_mpp

__all__ = ("CuCIMBackend", "import_cucim", "open_cuimage")

log = logging.getLogger(__name__)

#: what cuCIM's cuFile start-up prints (C ``printf``, at ``import cucim`` and at the first slide it opens)
#: on a machine with CUDA 13 libraries but no GPU driver; it tells a user nothing
NATIVE_NOISE = re.compile(rb"dlopen error libcuda\.so|missing cuda symbols while dynamic loading|"
                          rb"cuFile initialization failed")
_started = False
_start_lock = threading.Lock()


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """While the block runs, what native code writes to file descriptors 1 and 2 goes to temporary files;
    afterwards every line but :data:`NATIVE_NOISE` (logged at debug level) is written back to the stream
    it was meant for. Library users (not only the CLI, which filters its whole run) so no longer see
    cuCIM's cuFile lines. C's own stdio buffer is flushed before the descriptors are restored, or a
    buffered ``printf`` would land on the real stream later."""
    import ctypes

    try:
        libc: Any = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no C library to flush: leave the streams alone
        yield
        return
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            f.flush()
    saved = [os.dup(1), os.dup(2)]
    tmps = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    try:
        for fd, t in zip((1, 2), tmps):
            os.dup2(t.fileno(), fd)
        try:
            yield
        finally:
            libc.fflush(None)
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
        for fd, t in zip((1, 2), tmps):
            t.seek(0)
            for line in t.read().splitlines(keepends=True):
                if NATIVE_NOISE.search(line):
                    log.debug("native output: %s", line.decode(errors="replace").strip())
                else:
                    os.write(fd, line)
    finally:
        for x in saved:
            os.close(x)
        for t in tmps:
            t.close()


def import_cucim() -> Any:
    """``import cucim``, the first time under :func:`quiet_native_output` (its cuFile start-up prints)"""
    if "cucim" in sys.modules:
        return sys.modules["cucim"]
    with _start_lock, quiet_native_output():
        import cucim  # heavy, optional

    return cucim


def open_cuimage(path: Path) -> Any:
    """``cucim.CuImage(path)``; the first open in a process (where cuCIM's cuFile start-up prints again)
    runs under :func:`quiet_native_output`"""
    global _started
    CuImage = import_cucim().CuImage
    if _started:
        return CuImage(str(path))
    with _start_lock, quiet_native_output():
        img = CuImage(str(path))
        _started = True
    return img


class CuCIMBackend(Backend):
    name = "cucim"

    def __init__(self, path: Path, num_workers: int) -> None:
        self._img = open_cuimage(path)
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
