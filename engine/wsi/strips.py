"""Stripped (untiled) TIFF levels read in row bands, in bounded memory whatever the strip layout.

Where it sits: the tiffslide backend (:mod:`.tiffslide`) reads every stripped level of a slide through a
:class:`StripLevel`, and :func:`~.slide.open_slide` prefers that backend for stripped TIFFs. cuCIM loads
a stripped TIFF whole on its "slow path" (as RGBA) or cannot decode it at all (deflate strips), and
tiffslide decodes a whole strip for every region it touches: a 20,000^2 single-strip file peaked at
4.3 GB. Here a strip is read in one of three ways:

- a strip of up to :data:`STRIP_DECODE_MAX_BYTES` decoded bytes (tifffile's default layout, most
  scanners' strips) is decoded whole with tifffile's own decoder (any compression tifffile reads),
  and the last few are kept (:data:`STRIP_CACHE_BYTES`);
- a larger uncompressed strip is read row by row at its file offsets;
- a larger deflate strip is inflated as a stream, from the nearest of the checkpoints (a copy of the
  inflater every :data:`CHECKPOINT_BYTES` of output) laid down on the way, so a band costs about its
  own size to inflate, wherever it lies.

A larger strip of another codec (LZW, JPEG, ...) cannot be decoded in parts: opening fails with a
named :class:`~.errors.SlideTooLargeError` rather than decoding gigabytes. Regions are copied out of
row chunks of at most :data:`CHUNK_BYTES`, so memory is the requested regions plus a few chunks.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.errors import CorruptSlideError, SlideTooLargeError, UnsupportedFormatError

__all__ = ("STRIP_DECODE_MAX_BYTES", "STRIP_CACHE_BYTES", "CHUNK_BYTES", "CHECKPOINT_BYTES", "RawFile",
           "StripLevel", "is_stripped")

#: a strip up to this many decoded bytes is decoded whole (tifffile writes strips of about 64 KiB)
STRIP_DECODE_MAX_BYTES = 64 << 20
#: decoded whole strips kept per level, for the next read of the same rows (a batch's regions that share
#: rows are read in one pass anyway). 128 MiB raised a 20,000^2 slide's peak from ~1.75 to ~1.97 GiB
STRIP_CACHE_BYTES = 32 << 20
#: rows are handed out in chunks of about this many bytes (large strips)
CHUNK_BYTES = 4 << 20
#: a large deflate strip keeps a copy of its inflater every this many bytes of output (~40 KiB each)
CHECKPOINT_BYTES = 8 << 20
_READ_BYTES = 1 << 20  # compressed bytes read per step of an inflate
_DEFLATE = (8, 32946)  # Adobe deflate, old-style deflate
_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand a byte to more than about this many


class RawFile:
    """a slide file held open for positional byte reads (``os.pread``: no shared offset, so reader
    threads need no lock), closed once; the tile check of slide.py and the strip reader share it"""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, n: int, offset: int) -> bytes:
        """``n`` bytes at ``offset`` (fewer at the end of the file)"""
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        """idempotent"""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def is_stripped(page: Any) -> bool:
    """whether a tifffile page stores its pixels in strips (not tiles)"""
    return not page.is_tiled and bool(page.dataoffsets)


class StripLevel:
    """one stripped level of a TIFF (a tifffile ``TiffPage``), read as RGB(A)/grey uint8 regions

    Only 8-bit, chunky (interleaved) pages, or single-sample ones, with no predictor or horizontal
    differencing; other layouts raise :class:`~.errors.UnsupportedFormatError` (the caller then reads
    the level another way)."""

    def __init__(self, path: Path, page: Any) -> None:
        self.path = Path(path)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.samples = int(page.samplesperpixel)
        bits = page.bitspersample
        planar = int(page.planarconfig)
        if (bits if isinstance(bits, int) else max(bits)) != 8 or (self.samples > 1 and planar != 1):
            raise UnsupportedFormatError(path, f"stripped page with {bits}-bit samples, planar configuration "
                                         f"{planar}: not read in bands")
        if int(page.predictor) not in (1, 2):
            raise UnsupportedFormatError(path, f"stripped page with predictor {int(page.predictor)}: "
                                         "not read in bands")
        self.rows_per_strip = max(1, min(int(page.rowsperstrip or self.height), self.height))
        self.offsets = [int(o) for o in page.dataoffsets]
        self.counts = [int(c) for c in page.databytecounts]
        self.compression = int(page.compression)
        self.predictor = int(page.predictor)
        self.row_bytes = self.width * self.samples
        strip_bytes = self.rows_per_strip * self.row_bytes
        n_strips = -(-self.height // self.rows_per_strip)
        if len(self.offsets) < n_strips:
            raise CorruptSlideError(path, f"{len(self.offsets)} strip offsets, its {self.width} x "
                                    f"{self.height} px need {n_strips}")
        if strip_bytes <= STRIP_DECODE_MAX_BYTES:
            self.mode = "whole"
        elif self.compression == 1:
            self.mode = "raw"
        elif self.compression in _DEFLATE:
            self.mode = "inflate"
        else:
            raise SlideTooLargeError(path, f"a {self.width} x {self.height} px level stored in strips of "
                                     f"{strip_bytes / 2**20:.0f} MiB decoded, compressed with codec "
                                     f"{page.compression.name} that cannot be decoded in parts; the "
                                     f"budget is {STRIP_DECODE_MAX_BYTES >> 20} MiB per strip (save it "
                                     "tiled, or deflate)")
        self._decode = page.decode  # tifffile's segment decoder: every codec, predictor, fill order
        self._jpegtables = getattr(page, "jpegtables", None)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        # strip -> row -> (inflater, input offset, output pending at that row)
        self._checkpoints: dict[int, dict[int, tuple[Any, int, bytes]]] = {}
        self._lock = threading.Lock()
        self._file = RawFile(path)

    def close(self) -> None:
        self._file.close()
        self._cache.clear()
        self._checkpoints.clear()

    # -- reading -----------------------------------------------------------------------------------
    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, samples) uint8 of an in-bounds region (level pixels)"""
        return self.read_many([(x, y)], w, h)[0]

    def read_many(self, locations: Sequence[tuple[int, int]], w: int, h: int) -> np.ndarray:
        """(N, h, w, samples) uint8 of in-bounds regions; regions whose rows overlap are served from one
        pass over those rows"""
        out = np.empty((len(locations), h, w, self.samples), np.uint8)
        for x, y in locations:
            if x < 0 or y < 0 or x + w > self.width or y + h > self.height:
                raise ValueError(f"region ({x}, {y}, {w}, {h}) outside the {self.width} x {self.height} "
                                 "level")
        order = sorted(range(len(locations)), key=lambda i: locations[i][1])
        k = 0
        while k < len(order):  # a group: regions whose row ranges chain into one band
            group = [order[k]]
            end = locations[order[k]][1] + h
            k += 1
            while k < len(order) and locations[order[k]][1] <= end:
                group.append(order[k])
                end = max(end, locations[order[k]][1] + h)
                k += 1
            start = locations[group[0]][1]
            for r0, rows in self.rows(start, end):
                r1 = r0 + rows.shape[0]
                for i in group:
                    x, y = locations[i]
                    a, b = max(r0, y), min(r1, y + h)
                    if a < b:
                        out[i, a - y:b - y] = rows[a - r0:b - r0, x:x + w]
        return out

    def rows(self, y0: int, y1: int) -> Iterator[tuple[int, np.ndarray]]:
        """rows ``y0 <= row < y1`` as ``(first row, (n, width, samples) uint8)`` chunks, in order"""
        rps = self.rows_per_strip
        for s in range(y0 // rps, (y1 - 1) // rps + 1):
            base = s * rps
            a, b = max(y0, base) - base, min(y1, base + rps, self.height) - base
            if self.mode == "whole":
                strip = self._strip(s)
                if strip.shape[0] < b:
                    raise CorruptSlideError(self.path, f"strip {s} holds {strip.shape[0]} of its {b} rows")
                yield base + a, strip[a:b]
            else:
                for r, chunk in (self._raw_rows if self.mode == "raw" else self._inflated_rows)(s, a, b):
                    yield base + r, chunk

    def _strip(self, s: int) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(s)
            if hit is not None:
                self._cache.move_to_end(s)
                return hit
        if self.counts[s] == 0:  # sparse: absent on purpose
            rows = min(self.rows_per_strip, self.height - s * self.rows_per_strip)
            arr = np.zeros((rows, self.width, self.samples), np.uint8)
        else:
            data = self._file.read(self.counts[s], self.offsets[s])
            try:
                seg, _, shape = self._decode(data, s, jpegtables=self._jpegtables)
            except Exception as exc:
                raise CorruptSlideError(self.path, f"strip {s} cannot be decoded: {exc}") from exc
            if seg is None:
                raise CorruptSlideError(self.path, f"strip {s} cannot be decoded")
            arr = np.asarray(seg).reshape(-1, self.width, self.samples)
            if arr.dtype != np.uint8:
                arr = arr.astype(np.uint8)
        with self._lock:
            self._cache[s] = arr
            while sum(a.nbytes for a in self._cache.values()) > STRIP_CACHE_BYTES and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return arr

    def _chunk_rows(self) -> int:
        return max(1, CHUNK_BYTES // self.row_bytes)

    def _undo_predictor(self, flat: np.ndarray, n: int) -> np.ndarray:
        arr = flat.reshape(n, self.width, self.samples)
        if self.predictor == 2:  # horizontal differencing: a running sum along each row, modulo 256
            arr = np.cumsum(arr, axis=1, dtype=np.uint8)
        return arr

    def _raw_rows(self, s: int, a: int, b: int) -> Iterator[tuple[int, np.ndarray]]:
        if self.counts[s] < b * self.row_bytes:
            raise CorruptSlideError(self.path, f"uncompressed strip {s} has {self.counts[s]} bytes, its rows "
                                    f"up to {b} need {b * self.row_bytes}")
        step = self._chunk_rows()
        for r in range(a, b, step):
            n = min(step, b - r)
            data = self._file.read(n * self.row_bytes, self.offsets[s] + r * self.row_bytes)
            if len(data) < n * self.row_bytes:
                raise CorruptSlideError(self.path, f"uncompressed strip {s} ends inside row {r}")
            yield r, self._undo_predictor(np.frombuffer(data, np.uint8), n)

    def _inflated_rows(self, s: int, a: int, b: int) -> Iterator[tuple[int, np.ndarray]]:
        """inflate strip ``s`` from the last checkpoint at or before row ``a``, laying down new
        checkpoints on the way; yields rows ``a`` to ``b`` in chunks"""
        rb = self.row_bytes
        every = max(1, CHECKPOINT_BYTES // rb)
        step = self._chunk_rows()
        with self._lock:
            cps = self._checkpoints.setdefault(s, {0: (zlib.decompressobj(), self.offsets[s], b"")})
            start = max(r for r in cps if r <= a)
            inflater, pos, pending = cps[start]
            last = max(cps)
        # (a copy of an inflater keeps the input it was handed and had not used: its unconsumed_tail)
        d = inflater.copy()
        end = self.offsets[s] + self.counts[s]
        row = start
        buf = bytearray(pending)
        while row < b:
            if len(buf) >= rb:
                n = min(len(buf) // rb, b - row, step)
                if row + n > a:  # (rows before ``a`` are inflated and dropped)
                    lo = max(a - row, 0)
                    flat = np.frombuffer(bytes(buf[:n * rb]), np.uint8)
                    yield row + lo, self._undo_predictor(flat, n)[lo:]
                del buf[:n * rb]
                row += n
                if len(buf) < rb and row >= last + every:  # a row boundary with less than a row pending
                    with self._lock:
                        cps.setdefault(row, (d.copy(), pos, bytes(buf)))
                    last = row
                continue
            if d.unconsumed_tail:
                data = d.unconsumed_tail
            elif d.eof or pos >= end:
                raise CorruptSlideError(self.path, f"deflate strip {s} ends after {row} of its rows")
            else:
                data = self._file.read(min(_READ_BYTES, end - pos), pos)
                pos += len(data)
                if not data:
                    raise CorruptSlideError(self.path, f"deflate strip {s} ends after {row} of its rows")
            try:
                buf += d.decompress(data, step * rb)
            except zlib.error as exc:
                raise CorruptSlideError(self.path, f"deflate strip {s} is corrupt after row {row}: "
                                        f"{exc}") from exc

    @staticmethod
    def plausible(path: Path, page: Any) -> None:
        """raise :class:`~.errors.CorruptSlideError` when the page's strips cannot hold its pixels
        (a header that claims a huge image over a few bytes), before anything is decoded"""
        w, h = int(page.imagewidth), int(page.imagelength)
        spp = int(page.samplesperpixel)
        bits = page.bitspersample
        bits = bits if isinstance(bits, int) else max(bits)
        planes = spp if int(page.planarconfig) == 2 and spp > 1 else 1
        row_bytes = -(-w * (spp // planes) * bits // 8)
        rps = max(1, min(int(page.rowsperstrip or h), h))
        need = -(-h // rps) * planes
        counts = [int(c) for c in page.databytecounts]
        if len(counts) < need:
            raise CorruptSlideError(path, f"{len(counts)} strips, its {w} x {h} px need {need}")
        total = row_bytes * h * planes
        comp = int(page.compression)
        if comp == 1:
            for k, c in enumerate(counts[:need]):
                rows = min(rps, h - (k % (need // planes)) * rps)
                if 0 < c < rows * row_bytes:
                    raise CorruptSlideError(path, f"uncompressed strip {k} has {c} bytes, its {rows} rows "
                                            f"need {rows * row_bytes}")
        elif comp in _DEFLATE and sum(counts) * _MAX_DEFLATE_RATIO < total:
            raise CorruptSlideError(path, f"{sum(counts)} bytes of deflate data cannot hold the {total} "
                                    f"bytes of a {w} x {h} px image")
