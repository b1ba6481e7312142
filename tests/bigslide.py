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
