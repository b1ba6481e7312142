"""Large pyramidal test slides built from real tissue (no noise): for memory and throughput tests.

Real tissue patches are cut from a real slide's tissue tiles and laid out as one tissue blob
(an ellipse of patches on white glass), written as a tiled, JPEG-compressed, multi-resolution TIFF
with tifffile. Tiles are generated lazily, so building a big slide needs little memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

TILE = 256


def real_patches(source: Path, n: int = 48, size: int = TILE, seed: int = 0) -> np.ndarray:
    """``n`` real tissue patches (size x size RGB) from the tissue grid of ``source``"""
    from cellvit_optimus.engine.wsi.slide import open_slide
    from cellvit_optimus.engine.wsi.tissue import TilingConfig, tile_grid

    with open_slide(source) as s:
        grid = tile_grid(s, TilingConfig(tile_size=size, target_mpp=s.mpp[0], min_tissue_fraction=0.9))
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(grid), size=min(n, len(grid)), replace=False)
        return s.read_regions([tuple(c) for c in grid.coords[pick].tolist()], 0, (size, size))


def make_big_slide(path: Path, cols: int, rows: int, source: Path, mpp: float = 0.5, levels: int = 3,
                   seed: int = 0) -> Path:
    """write a ``cols`` x ``rows`` tile (256 px) slide whose central ellipse is real tissue"""
    import tifffile

    patches = real_patches(source, seed=seed)
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(patches), size=(rows, cols))
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    yy, xx = np.mgrid[0:rows, 0:cols]
    inside = ((yy - cy) / (rows / 2 - 0.5)) ** 2 + ((xx - cx) / (cols / 2 - 0.5)) ** 2 <= 1.0
    white = np.full((TILE, TILE, 3), 243, np.uint8)

    def level_tiles(k: int) -> Iterator[np.ndarray]:
        f = 2 ** k  # each level-k tile covers f x f level-0 tiles
        for ty in range(0, rows, f):
            for tx in range(0, cols, f):
                block = np.empty((f * TILE, f * TILE, 3), np.uint8)
                for j in range(f):
                    for i in range(f):
                        y, x = ty + j, tx + i
                        t = white if (y >= rows or x >= cols or not inside[y, x]) else patches[choice[y, x]]
                        block[j * TILE:(j + 1) * TILE, i * TILE:(i + 1) * TILE] = t
                if f > 1:  # box-filter down to one tile
                    block = block.reshape(TILE, f, TILE, f, 3).mean(axis=(1, 3)).astype(np.uint8)
                yield block

    path.parent.mkdir(parents=True, exist_ok=True)
    res = 1e4 / mpp  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k in range(levels):
            f = 2 ** k
            h, w = -(-rows // f) * TILE, -(-cols // f) * TILE
            tw.write(level_tiles(k), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, resolution=(res / f, res / f),
                     resolutionunit="CENTIMETER", subfiletype=0 if k == 0 else 1, metadata=None)
    return path


def tissue_rows(width: int, height: int, source: Path, band: int = TILE,
                seed: int = 0) -> Iterator[np.ndarray]:
    """the rows of a ``width`` x ``height`` RGB image of real tissue (the patches of :func:`real_patches`
    as a central ellipse on white glass, as in :func:`make_big_slide`), ``band`` rows at a time"""
    patches = real_patches(source, seed=seed)
    cols, rows = -(-width // TILE), -(-height // TILE)
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(patches), size=(rows, cols))
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    yy, xx = np.mgrid[0:rows, 0:cols]
    inside = ((yy - cy) / (rows / 2 - 0.5)) ** 2 + ((xx - cx) / (cols / 2 - 0.5)) ** 2 <= 1.0
    strip = np.empty((TILE, cols * TILE, 3), np.uint8)
    for ty in range(rows):
        for tx in range(cols):
            strip[:, tx * TILE:(tx + 1) * TILE] = patches[choice[ty, tx]] if inside[ty, tx] else 243
        top = ty * TILE
        for r in range(0, min(TILE, height - top), band):
            yield strip[r:min(r + band, height - top), :width]


def write_stripped_tiff(path: Path, width: int, height: int, rows: Iterator[np.ndarray], rows_per_strip: int,
                        mpp: float = 0.5, level: int = 1) -> Path:
    """a single-page RGB TIFF in deflate-compressed strips of ``rows_per_strip`` rows (``height``: one
    strip), streamed to disk from ``rows`` (bands of whole rows) in bounded memory. tifffile writes such
    files too (``rowsperstrip``), but only from the whole image or one array per strip."""
    import struct
    import zlib

    offsets: list[int] = []
    counts: list[int] = []
    with open(path, "wb") as f:
        f.write(b"II*\x00\x00\x00\x00\x00")  # the directory's offset is written at the end
        comp, in_strip = zlib.compressobj(level), 0

        def close_strip() -> None:
            nonlocal comp, in_strip
            tail = comp.flush()
            f.write(tail)
            counts[-1] += len(tail)
            comp, in_strip = zlib.compressobj(level), 0

        for band in rows:
            band = np.ascontiguousarray(band, np.uint8)
            k = 0
            while k < band.shape[0]:
                if in_strip == 0:
                    offsets.append(f.tell())
                    counts.append(0)
                n = min(rows_per_strip - in_strip, band.shape[0] - k)
                data = comp.compress(band[k:k + n].tobytes())
                f.write(data)
                counts[-1] += len(data)
                in_strip += n
                k += n
                if in_strip == rows_per_strip:
                    close_strip()
        if in_strip:
            close_strip()
        # the directory, then the values that do not fit in an entry
        res = (int(round(1e4 / mpp * 1000)), 1000)  # pixels per centimetre
        entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, None), (259, 3, 1, 8), (262, 3, 1, 2),
                   (273, 4, len(offsets), None), (277, 3, 1, 3), (278, 4, 1, rows_per_strip),
                   (279, 4, len(counts), None), (282, 5, 1, None), (283, 5, 1, None), (284, 3, 1, 1),
                   (296, 3, 1, 3)]
        extra = {258: struct.pack("<3H", 8, 8, 8), 273: struct.pack(f"<{len(offsets)}I", *offsets),
                 279: struct.pack(f"<{len(counts)}I", *counts), 282: struct.pack("<2I", *res),
                 283: struct.pack("<2I", *res)}
        ifd = f.tell() + (f.tell() & 1)
        f.write(b"\x00" * (ifd - f.tell()))
        after = ifd + 2 + 12 * len(entries) + 4
        table, blobs = [], b""
        for tag, typ, n, value in entries:
            if value is not None or len(extra[tag]) <= 4:
                raw = struct.pack("<I" if typ == 4 else "<H", value) if value is not None else extra[tag]
                table.append(struct.pack("<HHI", tag, typ, n) + raw.ljust(4, b"\x00"))
            else:
                table.append(struct.pack("<HHII", tag, typ, n, after + len(blobs)))
                blobs += extra[tag]
        f.write(struct.pack("<H", len(entries)) + b"".join(table) + b"\x00\x00\x00\x00" + blobs)
        f.seek(4)
        f.write(struct.pack("<I", ifd))
    return path


def flipped_cmu(path: Path, slides_dir: Path) -> Path:
    """another real slide of the same size class: CMU-1-Small-Region's pixels mirrored, written as a tiled
    JPEG TIFF with its MPP (a second, different real slide for batch and naming tests)"""
    import tifffile
    from cellvit_optimus.engine.wsi.slide import open_slide

    with open_slide(slides_dir / "cmu-1-small-region.svs") as s:
        img = s.read_region((0, 0), 0, s.dimensions)[:, ::-1].copy()
        mpp = s.mpp[0]
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path
