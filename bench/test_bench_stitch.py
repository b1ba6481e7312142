"""Stitching overlapping tiles' nuclei: :func:`stitch_tiles` beside CellViT-style pairwise polygon
de-duplication, in nuclei/s.

Input: the annotated instances of real MoNuSeg images (1000x1000 at 40x), cut into 256 px tiles with
64 px overlap as the nuclei path tiles a slide; each tile's instances are relabelled and tabulated
(:func:`instance_table`), so both sides get the same per-tile nuclei with contours.

- ours: nearest-centre ownership, vectorised per tile, plus a pixel-overlap safety pass on box-overlapping
  survivors
- baseline: what CellViT++'s post-processing does without a spatial index: every nucleus of every tile
  as a shapely polygon in slide coordinates, a Python loop over the pairs of nuclei from overlapping
  tiles, a box test, then polygon intersection over the smaller area > 0.5 drops the one further from
  its tile's centre

Group ``stitch-monuseg``; ``nuclei_per_s`` counts the input nuclei (all tiles, before de-duplication);
``kept`` and ``truth`` (annotated nuclei) are in ``extra_info``. Under ``--benchmark-disable`` one image
and the first 6 tiles only.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchutil import record
from cellvit_optimus.engine.training.datasets import load_monuseg
from cellvit_optimus.kernels import TileInstances, instance_table, stitch_tiles

TILE, OVERLAP = 256, 64
N_IMAGES = 2


def _origins(h: int, w: int) -> list[tuple[int, int]]:
    stride = TILE - OVERLAP
    ys = list(range(0, h - TILE + 1, stride))
    xs = list(range(0, w - TILE + 1, stride))
    ys += [h - TILE] if ys[-1] + TILE < h else []
    xs += [w - TILE] if xs[-1] + TILE < w else []
    return [(x, y) for y in ys for x in xs]


def _tiles(inst_map: np.ndarray, x_off: int) -> list[TileInstances]:
    out = []
    for x, y in _origins(*inst_map.shape):
        crop = inst_map[y : y + TILE, x : x + TILE]
        _, relabel = np.unique(crop, return_inverse=True)  # 0 stays 0 (present: background)
        local = relabel.reshape(crop.shape).astype(np.int32)
        if crop.min() > 0:
            local += 1
        out.append(TileInstances(x0=x + x_off, y0=y, inst_map=local, table=instance_table(local)))
    return out


@pytest.fixture(scope="module")
def monuseg(nuclei_dir):
    samples = load_monuseg(nuclei_dir)[:N_IMAGES]
    # images side by side with a gap, as separate regions of one slide
    tiles = [t for i, s in enumerate(samples) for t in _tiles(s.inst_map, i * 1200)]
    truth = sum(int(np.unique(s.inst_map).size - 1) for s in samples)
    return tiles, truth


def naive_dedup(tiles: list[TileInstances], threshold: float = 0.5) -> int:
    """pairwise polygon de-duplication in pure Python loops (no spatial index); returns nuclei kept"""
    import shapely

    cells = []  # (tile, polygon, box, distance to own tile centre)
    for t, tile in enumerate(tiles):
        h, w = tile.inst_map.shape
        cx, cy = tile.x0 + w / 2, tile.y0 + h / 2
        for k, contour in enumerate(tile.table.contours):
            poly = shapely.Polygon(contour + (tile.x0, tile.y0))
            x, y = tile.table.centroids[k] + (tile.x0, tile.y0)
            cells.append((t, poly, poly.bounds, max(abs(x - cx), abs(y - cy))))
    rects = [(t.x0, t.y0, t.x0 + t.inst_map.shape[1], t.y0 + t.inst_map.shape[0]) for t in tiles]
    dropped = [False] * len(cells)
    for i in range(len(cells)):
        ti, pi, bi, di = cells[i]
        ri = rects[ti]
        for j in range(i + 1, len(cells)):
            tj, pj, bj, dj = cells[j]
            if tj == ti or dropped[i] or dropped[j]:
                continue
            rj = rects[tj]
            if rj[0] >= ri[2] or rj[2] <= ri[0] or rj[1] >= ri[3] or rj[3] <= ri[1]:
                continue
            if bj[0] >= bi[2] or bj[2] <= bi[0] or bj[1] >= bi[3] or bj[3] <= bi[1]:
                continue
            inter = pi.intersection(pj).area
            if inter > threshold * max(min(pi.area, pj.area), 1e-9):
                dropped[j if dj > di else i] = True
    return len(cells) - sum(dropped)


@pytest.mark.benchmark(group="stitch-monuseg")
@pytest.mark.parametrize("impl", ["optimus", "naive-pairwise-shapely"])
def test_stitch(benchmark, monuseg, impl):
    tiles, truth = monuseg
    if benchmark.disabled:
        tiles = tiles[:6]
    n_in = sum(len(t.table) for t in tiles)
    if impl == "optimus":
        table, _ = benchmark.pedantic(lambda: stitch_tiles(tiles), rounds=5, warmup_rounds=1)
        kept = len(table)
    else:
        kept = benchmark.pedantic(lambda: naive_dedup(tiles), rounds=2, warmup_rounds=0)
    benchmark.extra_info.update(impl=impl, tiles=len(tiles), kept=kept, truth=truth)
    record(benchmark, nuclei=n_in)
    assert 0 < kept <= n_in
    if not benchmark.disabled:
        # both must land near the annotated count (cut nuclei at image borders differ by a few percent)
        assert abs(kept - truth) <= 0.1 * truth, (kept, truth)
