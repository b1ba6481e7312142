"""Whole-slide readers: one slide object over several backends (cuCIM first, tiffslide, DICOM, OpenSlide).

This is the engine's first stage. ``open_slide(path)`` sniffs the file, checks it is complete, picks
a backend (cuCIM where it opens the file, tiffslide where it cannot, a pydicom reader for DICOM
whole-slide images) and returns a :class:`Slide` with an OpenSlide-like API: ``level_count``,
``level_dimensions`` (width, height), ``level_downsamples``, ``mpp``, ``vendor``,
``associated_images``, ``read_region`` and the batched ``read_regions``. Every backend returns
RGB uint8 ``(h, w, 3)`` arrays; regions reaching past the slide edge are filled with white (255) the
same way on every backend, so the same request gives the same pixels whichever backend serves it.

Tiles at a target resolution go through :meth:`Slide.read_tiles`: the region covering ``tile_size``
pixels at ``target_mpp`` is read from the best pyramid level at or above that resolution and
resampled with antialiasing to exactly ``tile_size``.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cellvit_optimus.engine.errors import (
    BackendUnavailableError,
    ConfigError,
    CorruptSlideError,
    CorruptTilesError,
    NoMPPError,
    NotASlideError,
    SlideError,
    SlideNotFoundError,
    SlideTooLargeError,
    UnsupportedFormatError,
)
from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.wsi.backend import MPP_PLAUSIBLE, Backend, BackendName
from cellvit_optimus.engine.wsi.jpegcheck import strict_decode
from cellvit_optimus.engine.wsi.strips import RawFile, StripLevel, is_stripped

# re-exported: callers (the triage tests) expand slide folders through the slide module
from cellvit_optimus.engine.wsi.paths import file_kind, iter_slide_paths

__all__ = ("MPP_PLAUSIBLE", "BackendName", "Slide", "available_backends", "iter_slide_paths", "open_slide")

log = logging.getLogger(__name__)

#: a thumbnail's source level up to this many pixels is read in one piece (~100 MB of RGB); a larger
#: one (single-level or huge slides) is read in blocks of THUMBNAIL_BLOCK^2 pixels and box-averaged into
#: the thumbnail as it goes, so memory stays at one block plus the thumbnail whatever the slide's size
THUMBNAIL_ONE_PIECE_PIXELS = 1 << 25
THUMBNAIL_BLOCK = 4096
#: a thumbnail that would have to decode more pixels than this fails with SlideTooLargeError instead of
#: running for hours (a 50,000^2 single-level slide is 2.5e9; a forged 10^6 x 10^6 header is 1e12)
THUMBNAIL_MAX_READ_PIXELS = 16 * 10**9

#: a TIFF with more image directories than this is refused before they are parsed: a whole-slide image has
#: a handful (levels, thumbnail, label, macro), and parsing 100,000 forged ones took 19 s
MAX_TIFF_PAGES = 1024

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_OTHER_IMAGE_MAGICS = {
    b"\x89PNG": "PNG image",
    b"\xff\xd8\xff": "JPEG image",
    b"GIF8": "GIF image",
    b"BM": "BMP image",
}


def available_backends() -> tuple[str, ...]:
    """names of the slide backends importable in this environment, in preference order"""
    names = []
    for name, module in (("cucim", "cucim"), ("tiffslide", "tiffslide"), ("dicom", "pydicom"),
                         ("openslide", "openslide")):
        try:
            _import_backend_module(module)
        except Exception:  # a broken optional install counts as missing
            continue
        names.append(name)
    return tuple(names)


# --------------------------------------------------------------------------------------------------
# sniffing and integrity checks (before any backend sees the file)
# --------------------------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    """'tiff', 'dicom', or raise the matching SlideError

    Only a regular file is read: opened without blocking and checked before a byte is read, since
    reading a FIFO (or a terminal, a socket) waits for a writer that may never come."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except IsADirectoryError as exc:
        raise NotASlideError(path, "is a directory") from exc
    except OSError as exc:
        raise SlideError(path, f"cannot be read: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        kind = file_kind(st.st_mode)
        if kind is not None:
            raise NotASlideError(path, f"is {kind}, not a regular file")
        size = st.st_size
        head = os.pread(fd, 132, 0)
    except OSError as exc:
        raise SlideError(path, f"cannot be read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if size == 0:
        raise NotASlideError(path, "file is empty")
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    for magic, what in _OTHER_IMAGE_MAGICS.items():
        if head.startswith(magic):
            raise UnsupportedFormatError(path, f"{what}, not a whole-slide image; "
                                         "use `cellvit-optimus segment` for plain images")
    if _looks_like_text(head):
        raise NotASlideError(path, "file contains text, not image data")
    raise NotASlideError(path, f"unrecognised file signature {head[:8]!r}")


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 9 for c in head)


#: TIFF field type -> bytes per value (BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED, SSHORT, SLONG,
#: SRATIONAL, FLOAT, DOUBLE, IFD, LONG8, SLONG8, IFD8)
_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
                   16: 8, 17: 8, 18: 8}


def _check_ifd_chain(path: Path, size: int, order: str, big: bool, first_ifd: int) -> None:
    """every image directory, and every tag value it points to, must lie inside the file. A copy cut
    inside a directory otherwise loses tags silently (tifffile drops what it cannot read): a cut
    ImageDescription then surfaced as "no MPP" instead of as the truncation it is."""
    entry, count_fmt, off_fmt, inline = (20, "Q", "Q", 8) if big else (12, "H", "I", 4)
    head_n = 8 if big else 2
    seen: set[int] = set()
    ifd, page = first_ifd, 0
    with path.open("rb") as f:
        while ifd:
            if page >= MAX_TIFF_PAGES:
                raise UnsupportedFormatError(path, f"more than {MAX_TIFF_PAGES} image directories, where a "
                                             "whole-slide image has a few (levels, label, macro)")
            if ifd in seen:
                raise CorruptSlideError(path, f"directory chain loops back to byte {ifd} (page {page})")
            seen.add(ifd)
            f.seek(ifd)
            raw = f.read(head_n)
            if len(raw) < head_n:
                raise CorruptSlideError(path, f"truncated: directory of page {page} at byte {ifd}, "
                                        f"file has {size} bytes")
            (n,) = struct.unpack(order + count_fmt, raw)
            table = f.read(n * entry + inline)
            if len(table) < n * entry + inline:
                raise CorruptSlideError(path, f"truncated inside the directory of page {page} (byte {ifd}, "
                                        f"{n} entries); file has {size} bytes")
            for k in range(n):
                e = table[k * entry:(k + 1) * entry]
                code, typ = struct.unpack(order + "HH", e[:4])
                cnt, val = struct.unpack(order + ("QQ" if big else "II"), e[4:])
                nbytes = _TIFF_TYPE_SIZE.get(typ, 0) * cnt
                if nbytes > inline and val + nbytes > size:
                    raise CorruptSlideError(path, f"truncated: page {page} tag {code} needs bytes up to "
                                            f"{val + nbytes}, file has {size}")
            (ifd,) = struct.unpack(order + off_fmt, table[n * entry:])
            if ifd >= size:
                raise CorruptSlideError(path, f"truncated: directory of page {page + 1} at byte {ifd}, "
                                        f"file has {size} bytes")
            page += 1


@dataclass(frozen=True)
class _JpegPage:
    """where a tiled JPEG page's compressed tiles are, for :class:`_TileCheck`"""

    size: tuple[int, int]  # (width, height)
    tile: tuple[int, int]  # (width, height)
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tables: bytes | None  # JPEGTables (abbreviated tile streams: SVS)
    #: photometric YCbCr: a plain JPEG decoder gives the right colours (SVS "RGB" JPEG tiles do not)
    ycbcr: bool = False


def _check_tiff_complete(path: Path) -> tuple[list[_JpegPage], bool]:
    """every directory and every strip/tile of every page must lie inside the file (catches truncated
    copies up front instead of failing half-way through a slide), every page must have pixels, and
    strips must be able to hold them (a forged header claiming a huge image over a few bytes fails
    here, in milliseconds); returns the tiled JPEG pages and whether the first page (level 0) is stripped"""
    import tifffile

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    if len(head) < (16 if big else 8):
        raise CorruptSlideError(path, f"truncated: {size} bytes is shorter than a TIFF header")
    first_ifd = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
    if first_ifd >= size:
        raise CorruptSlideError(path, f"truncated: first image directory at byte {first_ifd}, "
                                f"file has {size} bytes")
    _check_ifd_chain(path, size, order, big, first_ifd)
    pages: list[_JpegPage] = []
    tiff_log = logging.getLogger("tifffile")
    level = tiff_log.level
    tiff_log.setLevel(logging.ERROR)  # its own warnings duplicate what we raise
    try:
        with tifffile.TiffFile(str(path)) as tf:
            if len(tf.pages) == 0:
                raise CorruptSlideError(path, "no readable image directory")
            with path.open("rb") as raw:
                for i, page in enumerate(tf.pages):
                    if int(page.imagewidth) <= 0 or int(page.imagelength) <= 0:
                        raise CorruptSlideError(path, f"page {i} is {page.imagewidth} x {page.imagelength} "
                                                "px: no image")
                    offs, counts = page.dataoffsets, page.databytecounts
                    if not offs:
                        continue
                    end = max(o + c for o, c in zip(offs, counts))
                    if end > size:
                        raise CorruptSlideError(path, f"truncated: page {i} needs {end} bytes, "
                                                f"file has {size}")
                    _check_codec_markers(path, raw, i, int(page.compression), offs, counts)
                    tw, tl = int(page.tilewidth or 0), int(page.tilelength or 0)
                    if (tw or tl) and (tw <= 0 or tl <= 0):
                        raise CorruptSlideError(path, f"page {i}: tile size {tw} x {tl}")
                    if tw and tl:
                        need = -(-int(page.imagewidth) // tw) * -(-int(page.imagelength) // tl)
                        if len(offs) < need:
                            raise CorruptSlideError(path, f"page {i}: {len(offs)} tile offsets, its "
                                                    f"{page.imagewidth} x {page.imagelength} px need {need}")
                    elif is_stripped(page):
                        StripLevel.plausible(path, page)
                    if int(page.compression) == 7 and page.is_tiled and page.samplesperpixel in (1, 3):
                        tables = getattr(page, "jpegtables", None)
                        pages.append(_JpegPage((int(page.imagewidth), int(page.imagelength)),
                                               (int(page.tilewidth), int(page.tilelength)),
                                               tuple(int(o) for o in offs), tuple(int(c) for c in counts),
                                               bytes(tables) if tables else None, int(page.photometric) == 6))
            stripped = is_stripped(tf.pages[0])
    except CorruptSlideError:
        raise
    except Exception as exc:  # tifffile cannot even parse the directory chain
        raise CorruptSlideError(path, f"TIFF structure unreadable: {exc}") from exc
    finally:
        tiff_log.setLevel(level)
    return pages, stripped


class _TileCheck:
    """strict re-decoding of the compressed JPEG tiles each read touches, once per tile

    libjpeg decodes damaged entropy-coded data with only a warning on stderr ("Corrupt JPEG data"),
    and every decoder here (imagecodecs, PIL, cuCIM) returns the damaged pixels: a slide with flipped
    bytes in a tile was analysed as if nothing happened. Each tile goes through
    :func:`~cellvit_optimus.engine.wsi.jpegcheck.strict_decode`. SVS tiles are abbreviated streams: the
    page's JPEGTables are spliced in (tables without their EOI + tile without its SOI). Only tiled JPEG
    levels are checked (other codecs: see the README)."""

    def __init__(self, path: Path, levels: dict[int, _JpegPage]) -> None:
        self.path = path
        self.levels = levels
        self.checked = 0
        self.corrupt: list[tuple[int, int, int]] = []  # (level, column, row)
        self._done: set[tuple[int, int]] = set()  # (level, tile index)
        self._lock = threading.Lock()
        self._file = RawFile(path)

    def close(self) -> None:
        self._file.close()

    def tiles_for(self, level: int, boxes: Sequence[tuple[int, int, int, int]]) -> list[int]:
        """indices of the unchecked tiles of ``level`` that the boxes (x, y, w, h; level pixels) touch"""
        pg = self.levels[level]
        tw, th = pg.tile
        cols = -(-pg.size[0] // tw)
        rows = -(-pg.size[1] // th)
        want: set[int] = set()
        for x, y, w, h in boxes:
            c0, r0 = max(x // tw, 0), max(y // th, 0)
            c1, r1 = min((x + w - 1) // tw, cols - 1), min((y + h - 1) // th, rows - 1)
            for r in range(r0, r1 + 1):
                want.update(range(r * cols + c0, r * cols + c1 + 1))
        with self._lock:
            return sorted(i for i in want if (level, i) not in self._done)

    def check(self, level: int, boxes: Sequence[tuple[int, int, int, int]]) -> None:
        """verify the tiles ``boxes`` touch; raises :class:`CorruptTilesError` naming the file, the count
        and the first positions when any is corrupt (policy: results are never computed from damaged
        pixels, whatever their share)"""
        if level not in self.levels:
            return
        pg = self.levels[level]
        cols = -(-pg.size[0] // pg.tile[0])
        head = pg.tables[:-2] if pg.tables and pg.tables.endswith(b"\xff\xd9") else pg.tables
        bad: list[tuple[int, int, int]] = []
        todo = self.tiles_for(level, boxes)
        for i in todo:
            if i >= len(pg.offsets) or pg.counts[i] == 0:  # sparse tile: absent on purpose
                continue
            data = self._file.read(pg.counts[i], pg.offsets[i])
            if head:
                data = head + data[2:]
            try:
                strict_decode(data)
            except (ValueError, RuntimeError) as exc:
                log.debug("%s: level %d tile %d: %s", self.path, level, i, exc)
                bad.append((level, i % cols, i // cols))
        with self._lock:
            # two reader threads may have checked the same tile: count each tile once
            fresh = [i for i in todo if (level, i) not in self._done]
            self._done.update((level, i) for i in fresh)
            self.checked += len(fresh)
            self.corrupt.extend(t for t in bad if t not in self.corrupt)
            corrupt = sorted(self.corrupt)
        if bad:
            self._fail(corrupt)

    def _fail(self, corrupt: list[tuple[int, int, int]]) -> None:
        where = ", ".join(f"level {lv} col {c} row {r}" for lv, c, r in corrupt[:5])
        more = f", +{len(corrupt) - 5} more" if len(corrupt) > 5 else ""
        raise CorruptTilesError(self.path, f"{len(corrupt)} corrupt JPEG tile(s) of {self.checked} "
                                f"checked: {where}{more}")

    def eighths(self, level: int) -> np.ndarray:
        """the whole ``level`` at 1/8 scale from the tiles' DC terms (each pixel the mean of an 8 x 8
        block, within rounding), every tile strictly checked on the way; (ceil(h/8), ceil(w/8), 3) uint8.
        Only for YCbCr pages with tiles in multiples of 8 (see :meth:`Slide.thumbnail`)."""
        pg = self.levels[level]
        (tw, th), (W, H) = pg.tile, pg.size
        cols, rows = -(-W // tw), -(-H // th)
        out = np.full((rows * th // 8, cols * tw // 8, 3), 255, np.uint8)
        head = pg.tables[:-2] if pg.tables and pg.tables.endswith(b"\xff\xd9") else pg.tables
        bad: list[tuple[int, int, int]] = []
        for i in range(min(cols * rows, len(pg.offsets))):
            if pg.counts[i] == 0:
                continue
            data = self._file.read(pg.counts[i], pg.offsets[i])
            if head:
                data = head + data[2:]
            r, c = divmod(i, cols)
            try:
                part = strict_decode(data)
            except (ValueError, RuntimeError):
                bad.append((level, c, r))
                continue
            out[r * th // 8:r * th // 8 + part.shape[0], c * tw // 8:c * tw // 8 + part.shape[1]] = part[
                :th // 8, :tw // 8]
        with self._lock:
            self._done.update((level, i) for i in range(cols * rows))
            self.checked += cols * rows
            self.corrupt.extend(bad)
            corrupt = sorted(self.corrupt)
        if bad:
            self._fail(corrupt)
        return out[:-(-H // 8), :-(-W // 8)]

    def report(self) -> JsonDict:
        """for summary.json: tiles checked and the corrupt ones' positions"""
        with self._lock:
            return {"checked": self.checked, "corrupt": len(self.corrupt),
                    "positions": [list(t) for t in sorted(self.corrupt)]}


#: compressed tiles must start with their codec's marker: JPEG SOI, JPEG 2000 SOC (+SIZ) or jp2 box.
#: Some decoders (cuCIM's) log a broken tile and return pixels anyway, so check before decoding.
_CODEC_MARKERS = {7: (b"\xff\xd8",), 33003: (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c"),
                  33005: (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c"),
                  34712: (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c")}


def _check_codec_markers(path: Path, raw, page: int, compression: int, offs, counts) -> None:
    markers = _CODEC_MARKERS.get(compression)
    if markers is None:
        return
    for k, (o, c) in enumerate(zip(offs, counts)):
        if c == 0:  # sparse tile: absent on purpose
            continue
        raw.seek(o)
        head = raw.read(4)
        if not any(head.startswith(m) for m in markers):
            raise CorruptSlideError(path, f"page {page} tile {k} at byte {o} is not a valid "
                                    f"{'JPEG' if compression == 7 else 'JPEG 2000'} stream")


# --------------------------------------------------------------------------------------------------
# the Slide
# --------------------------------------------------------------------------------------------------


@dataclass
class Slide:
    """an open whole-slide image; use :func:`open_slide` to make one"""

    path: Path
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None
    mpp_source: str
    vendor: str | None
    properties: JsonDict = field(repr=False)
    _impl: Backend = field(repr=False, default=None)  # type: ignore[assignment]
    _associated: dict[str, np.ndarray] | None = field(default=None, repr=False)
    #: strict check of the JPEG tiles each read touches (tiled JPEG TIFF levels; None elsewhere)
    _tiles: _TileCheck | None = field(default=None, repr=False)

    def tile_check(self) -> JsonDict | None:
        """tiles verified so far and the corrupt ones (level, column, row); None when not checked"""
        return None if self._tiles is None else self._tiles.report()

    # -- OpenSlide-like facts ----------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        """thumbnail / label / macro images where the file has them (RGB uint8), read on first use"""
        if self._associated is None:
            self._associated = self._impl.associated()
        return self._associated

    def level_mpp(self, level: int) -> tuple[float, float]:
        mx, my = self.require_mpp()
        d = self.level_downsamples[self._check_level(level)]
        return (mx * d, my * d)

    def require_mpp(self) -> tuple[float, float]:
        if self.mpp is None:
            raise NoMPPError(self.path, "no microns-per-pixel in the file's metadata; "
                             "pass an override (--mpp / mpp=)")
        return self.mpp

    # -- reading -----------------------------------------------------------------------------------
    def _check_level(self, level: int) -> int:
        if not 0 <= level < self.level_count:
            raise ConfigError(f"{self.path}: level={level} out of range (0..{self.level_count - 1})")
        return level

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) region; ``location`` (x, y) in level-0 pixels, ``size`` (w, h) at ``level``.
        Pixels beyond the slide are white."""
        return self.read_regions([location], level, size)[0]

    def read_regions(self, locations: Sequence[tuple[int, int]], level: int,
                     size: tuple[int, int]) -> np.ndarray:
        """batched :meth:`read_region`: (N, h, w, 3) uint8; cuCIM decodes the batch on worker threads"""
        level = self._check_level(level)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ConfigError(f"{self.path}: size={size} must be positive")
        W, H = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        inside, partial = [], []
        for i, (x, y) in enumerate(locations):
            lx, ly = x / ds, y / ds
            if lx >= 0 and ly >= 0 and lx + w <= W and ly + h <= H:
                inside.append(i)
            else:
                partial.append(i)
        if self._tiles is not None:
            # before decoding: a damaged tile fails the read instead of yielding plausible pixels
            self._tiles.check(level, [(int(math.floor(x / ds)), int(math.floor(y / ds)), w, h)
                                      for x, y in locations])
        try:
            if not partial:  # the reader's own array: a copy into another would double the batch's memory
                out = np.ascontiguousarray(self._impl.read_many([tuple(map(int, loc)) for loc in locations],
                                                                level, w, h))
                if out.shape != (len(locations), h, w, 3) or out.dtype != np.uint8:
                    raise ValueError(f"reader returned {out.shape} {out.dtype} for {len(locations)} regions "
                                     f"of {w} x {h}")
                return out
            out = np.empty((len(locations), h, w, 3), np.uint8)
            if inside:
                out[inside] = self._impl.read_many([tuple(map(int, locations[i])) for i in inside],
                                                   level, w, h)
            for i in partial:
                out[i] = self._read_clipped(int(locations[i][0]), int(locations[i][1]), level, w, h)
        except SlideError:
            raise
        except Exception as exc:
            raise CorruptSlideError(self.path, f"tile decode failed at level {level}: {exc}") from exc
        return out

    def _read_clipped(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        W, H = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        out = np.full((h, w, 3), 255, np.uint8)
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, W), min(ly + h, H)
        if x1 <= x0 or y1 <= y0:
            return out
        part = self._impl.read(int(round(x0 * ds)), int(round(y0 * ds)), level, x1 - x0, y1 - y0)
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = part
        return out

    # -- resolution-aware tiles --------------------------------------------------------------------
    def best_level_for(self, target_mpp: float) -> int:
        """the coarsest level whose resolution is at or above (finer than or equal to) ``target_mpp``"""
        mx, _ = self.require_mpp()
        best = 0
        for lvl, d in enumerate(self.level_downsamples):
            if mx * d <= target_mpp * 1.001:  # tolerate rounding of stored downsamples
                best = lvl
        return best

    def level0_tile_size(self, tile_size: int, target_mpp: float) -> tuple[int, int]:
        """(w, h) in level-0 pixels of a ``tile_size`` tile at ``target_mpp``"""
        mx, my = self.require_mpp()
        return (max(1, round(tile_size * target_mpp / mx)), max(1, round(tile_size * target_mpp / my)))

    def read_tiles(self, locations: Sequence[tuple[int, int]], tile_size: int = 224,
                   target_mpp: float = 0.5) -> np.ndarray:
        """(N, tile_size, tile_size, 3) uint8 tiles at ``target_mpp`` whose top-left corners are
        ``locations`` in level-0 pixels"""
        if tile_size <= 0 or target_mpp <= 0:
            raise ConfigError(f"tile_size={tile_size} and target_mpp={target_mpp} must be positive")
        level = self.best_level_for(target_mpp)
        w0, h0 = self.level0_tile_size(tile_size, target_mpp)
        ds = self.level_downsamples[level]
        rw, rh = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        raw = self.read_regions(locations, level, (rw, rh))
        if (rw, rh) == (tile_size, tile_size):
            return raw
        return resize_batch(raw, tile_size)

    def check_tiles(self, locations: Sequence[tuple[int, int]], tile_size: int = 224,
                    target_mpp: float = 0.5) -> None:
        """the strict tile check :meth:`read_tiles` does, without reading: for readers that decode the
        compressed tiles themselves (the GPU read path); raises :class:`CorruptTilesError`"""
        if self._tiles is None:
            return
        level = self.best_level_for(target_mpp)
        w0, h0 = self.level0_tile_size(tile_size, target_mpp)
        ds = self.level_downsamples[level]
        rw, rh = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        self._tiles.check(level, [(int(math.floor(x / ds)), int(math.floor(y / ds)), rw, rh)
                                  for x, y in locations])

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is at most ``max_size``, read from the smallest sufficient level

        Memory is bounded whatever the slide: a level larger than :data:`THUMBNAIL_ONE_PIECE_PIXELS` is
        read block by block (see :meth:`_thumbnail_blocks`); one that would need more than
        :data:`THUMBNAIL_MAX_READ_PIXELS` decoded raises :class:`SlideTooLargeError`.
        """
        W, H = self.dimensions
        scale = max(W, H) / max_size
        level = 0
        for lvl, d in enumerate(self.level_downsamples):
            if d <= max(scale, 1.0) * 1.001:
                level = lvl
        lw, lh = self.level_dimensions[level]
        tw, th = max(1, round(W / max(scale, 1.0))), max(1, round(H / max(scale, 1.0)))
        if lw * lh > THUMBNAIL_MAX_READ_PIXELS:
            raise SlideTooLargeError(self.path, f"a {max_size}-px thumbnail needs level {level} ({lw} x {lh} px) "
                                     f"decoded; the budget is {THUMBNAIL_MAX_READ_PIXELS:.2g} px")
        if lw * lh > THUMBNAIL_ONE_PIECE_PIXELS:
            pg = self._tiles.levels.get(level) if self._tiles is not None else None
            if (pg is not None and pg.ycbcr and pg.tile[0] % 8 == 0 and pg.tile[1] % 8 == 0
                    and min(lw // tw, lh // th) >= 8):
                # a huge JPEG level: its 1/8-scale DC image (a fraction of a full decode, which for a
                # 50,000^2 single-level slide took minutes) box-resized to the thumbnail
                from PIL import Image

                small = self._tiles.eighths(level)
                return np.asarray(Image.fromarray(small).resize((tw, th), Image.Resampling.BOX))
            return self._thumbnail_blocks(level, tw, th)
        img = self.read_region((0, 0), level, (lw, lh))
        if (tw, th) == (lw, lh):
            return img
        from PIL import Image

        return np.asarray(Image.fromarray(img).resize((tw, th), Image.Resampling.BOX))

    def _thumbnail_blocks(self, level: int, tw: int, th: int, block: int | None = None) -> np.ndarray:
        """(th, tw, 3) uint8 thumbnail of a large ``level`` read in squares of about ``block`` pixels:
        each square is box-averaged by the integer factor ``f = lw // tw`` into an intermediate image
        (at most about 2x the thumbnail per side), which is then box-resized to the thumbnail. Squares
        are multiples of ``f``, so no averaging window straddles two of them (no seams). A level that
        the backend reads in row bands (a stripped TIFF) is read in full-width bands of the same area
        instead, so each strip is decoded once."""
        from PIL import Image

        block = block or THUMBNAIL_BLOCK
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        f = max(1, min(lw // tw, lh // th))
        if self._impl.row_bands(level):
            step_x = -(-lw // f) * f
            step_y = max(f, block * block // lw // f * f)
        else:
            step_x = step_y = max(f, block // f * f)
        mw, mh = -(-lw // f), -(-lh // f)
        mid = np.empty((mh, mw, 3), np.uint8)
        for y0 in range(0, lh, step_y):
            y1 = min(y0 + step_y, lh)
            for x0 in range(0, lw, step_x):
                x1 = min(x0 + step_x, lw)
                loc = (int(round(x0 * ds)), int(round(y0 * ds)))
                if self._impl.blank(*loc, level, x1 - x0, y1 - y0):  # nothing stored there: white, unread
                    mid[y0 // f:-(-y1 // f), x0 // f:-(-x1 // f)] = 255
                    continue
                part = self.read_region(loc, level, (x1 - x0, y1 - y0))
                ph, pw = -(-(y1 - y0) // f) * f, -(-(x1 - x0) // f) * f
                if (ph, pw) != part.shape[:2]:  # the slide's last row/column of squares: repeat the edge
                    part = np.pad(part, ((0, ph - part.shape[0]), (0, pw - part.shape[1]), (0, 0)), mode="edge")
                # rows first on the contiguous layout, then columns: ~6x faster than one 2-axis sum
                rows = part.reshape(ph // f, f, pw, 3).sum(axis=1, dtype=np.uint32)
                sums = rows.reshape(ph // f, pw // f, f, 3).sum(axis=2)
                mid[y0 // f:y0 // f + ph // f, x0 // f:x0 // f + pw // f] = (sums + f * f // 2) // (f * f)
        if (mw, mh) == (tw, th):
            return mid
        return np.asarray(Image.fromarray(mid).resize((tw, th), Image.Resampling.BOX))

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
        if self._impl is not None:
            self._impl.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> JsonDict:
        """plain facts for tables and JSON"""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": list(self.mpp) if self.mpp else None,
            "mpp_source": self.mpp_source,
            "associated_images": sorted(self.associated_images),
        }


def resize_batch(tiles: np.ndarray, size: int) -> np.ndarray:
    """antialiased resampling of (N, h, w, 3) uint8 tiles to (N, size, size, 3)

    Pillow's separable convolution resampling (Lanczos when reducing, bicubic when enlarging) with
    the filter support widened by the scale factor when reducing: that is the antialiasing.
    """
    from PIL import Image

    n, h, w = tiles.shape[:3]
    filt = Image.Resampling.LANCZOS if (h >= size and w >= size) else Image.Resampling.BICUBIC
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(tiles[i]).resize((size, size), filt))
    return out


def open_slide(path: str | os.PathLike[str], backend: BackendName = "auto", mpp: float | None = None,
               num_workers: int = 2) -> Slide:
    """open a whole-slide image

    Parameters
    ----------
    path : the slide file (SVS, generic/pyramidal TIFF, NDPI, OME-TIFF, DICOM VL WSI, ...)
    backend : ``"auto"`` tries cuCIM, then tiffslide (DICOM files go to the DICOM reader); naming one
        forces it and fails with :class:`BackendUnavailableError` if it is not installed.
    mpp : microns per pixel at level 0, overriding (or standing in for missing) metadata.
    num_workers : decoder threads for cuCIM batched reads.
    """
    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(p, "no such file")
    if mpp is not None and not (MPP_PLAUSIBLE[0] <= float(mpp) <= MPP_PLAUSIBLE[1]):
        raise ConfigError(f"{p}: mpp={mpp} outside the plausible range {MPP_PLAUSIBLE} um/px")
    kind = _sniff(p)
    jpeg_pages: list[_JpegPage] = []
    if kind == "tiff":
        jpeg_pages, stripped = _check_tiff_complete(p)
        # a stripped level: cuCIM decodes it whole into memory ("slow path"), or not at all (deflate
        # strips), or crashes the process (JPEG strips: a segmentation fault in its constructor);
        # tiffslide's backend reads it in row bands
        first = ["tiffslide"] if stripped else ["cucim", "tiffslide"]
        order = [*first, "openslide"] if backend == "auto" else [backend]
    else:
        order = ["dicom", "openslide"] if backend == "auto" else [backend]
    errors: list[str] = []
    impl: Backend | None = None
    for name in order:
        try:
            impl = _make_backend(name, p, num_workers)
            if name == "cucim":
                _probe_decode(impl, p)
            break
        except BackendUnavailableError as exc:
            if backend != "auto":
                raise
            errors.append(f"{name}: not installed ({exc.detail if hasattr(exc, 'detail') else exc})")
        except SlideError:
            raise
        except _CannotDecode as exc:
            if backend != "auto":
                raise UnsupportedFormatError(p, f"backend {name!r} opens it but cannot decode it: "
                                             f"{exc}") from exc
            errors.append(f"{name}: cannot decode it ({exc})")
            log.info("%s: %s opens it but cannot decode it (%s); trying the next reader", p, name, exc)
        except Exception as exc:
            if backend != "auto":
                raise UnsupportedFormatError(p, f"backend {name!r} cannot open it: {exc}") from exc
            errors.append(f"{name}: {exc}")
            log.debug("%s cannot open %s: %s", name, p, exc)
    if impl is None:
        raise UnsupportedFormatError(p, "no backend could open it: " + "; ".join(errors))
    if mpp is not None:
        slide_mpp, source = (float(mpp), float(mpp)), "override"
    else:
        slide_mpp, source = impl.mpp, ("metadata" if impl.mpp else "missing")
    # each level is the tiled JPEG page of its size (the first such: SVS label/macro pages are strips)
    by_size: dict[tuple[int, int], _JpegPage] = {}
    for pg in jpeg_pages:
        by_size.setdefault(pg.size, pg)
    levels = {lv: by_size[tuple(d)] for lv, d in enumerate(impl.level_dimensions) if tuple(d) in by_size}
    return Slide(path=p, backend=impl.name, level_dimensions=impl.level_dimensions,
                 level_downsamples=impl.level_downsamples, mpp=slide_mpp, mpp_source=source,
                 vendor=impl.vendor, properties=impl.properties, _impl=impl,
                 _tiles=_TileCheck(p, levels) if levels else None)


class _CannotDecode(Exception):
    """a backend opened the file but failed to decode a pixel of it"""


def _probe_decode(impl: Backend, path: Path) -> None:
    """decode one pixel of the smallest level: cuCIM opens files whose codec it lacks (deflate strips)
    and fails only at the first read, which would fail the slide as corrupt although another reader
    decodes it. Raises :class:`_CannotDecode` (the backend closed) so that open_slide tries the next."""
    level = len(impl.level_dimensions) - 1
    try:
        impl.read(0, 0, level, 1, 1)
    except Exception as exc:
        impl.close()
        raise _CannotDecode(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc


def _import_backend_module(module: str) -> None:
    """import a backend's library; cuCIM's first import runs with its native start-up lines filtered"""
    if module == "cucim":
        from cellvit_optimus.engine.wsi.cucim import import_cucim

        import_cucim()
    else:
        __import__(module)


def _make_backend(name: str, path: Path, num_workers: int) -> Backend:
    module = {"cucim": "cucim", "tiffslide": "tiffslide", "dicom": "pydicom", "openslide": "openslide"}.get(name)
    if module is None:
        raise ConfigError(f"backend={name!r} is not one of auto, cucim, tiffslide, dicom, openslide")
    try:
        _import_backend_module(module)
    except Exception as exc:
        hint = {"cucim": 'pip install --no-deps "cucim-cu13==26.10.*"',
                "openslide": "pip install 'cellvit-optimus[openslide]'"}.get(name, f"pip install {module}")
        raise BackendUnavailableError(f"slide backend {name!r} needs {module!r} ({hint}): {exc}") from exc
    # each backend's module is imported only when it is asked for
    if name == "cucim":
        from cellvit_optimus.engine.wsi.cucim import CuCIMBackend

        return CuCIMBackend(path, num_workers)
    if name == "tiffslide":
        from cellvit_optimus.engine.wsi.tiffslide import TiffSlideBackend

        return TiffSlideBackend(path)
    if name == "openslide":
        from cellvit_optimus.engine.wsi.openslide import OpenSlideBackend

        return OpenSlideBackend(path)
    from cellvit_optimus.engine.wsi.dicom import DicomBackend

    return DicomBackend(path)
