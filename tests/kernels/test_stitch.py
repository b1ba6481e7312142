"""Stitching: a real 1000x1000 MoNuSeg image cut into 256 px tiles with 64 px overlap, processed per
tile and stitched, must match the whole-image result."""

from __future__ import annotations

import numpy as np
import pytest
import shapely


from cellvit_optimus.engine.training.datasets import load_monuseg
from cellvit_optimus.kernels import (
    TileInstances,
    hv_to_instances,
    instance_table,
    instances_to_hv,
    match_instances,
    pq,
    sobel_range,
    stitch_tiles,
)
from reference_hovernet import noisy_maps  # type: ignore[import-not-found]


def _tiles(h, w, size, overlap):
    stride = size - overlap
    ys = list(range(0, max(h - size, 0) + 1, stride))
    xs = list(range(0, max(w - size, 0) + 1, stride))
    if ys[-1] + size < h:
        ys.append(h - size)
    if xs[-1] + size < w:
        xs.append(w - size)
    return [(y, x) for y in ys for x in xs]


@pytest.mark.parametrize(
    "mode,fixed_range",
    [("hovernet", True), ("hovernet", False), ("optimus", False)],
    ids=["hovernet-fixed-sobel-range", "hovernet-per-tile-norm", "optimus"],
)
@pytest.mark.parametrize("index,noisy", [(0, False), (4, True), (9, True)])
def test_stitched_matches_whole_image(nuclei_dir, index, noisy, mode, fixed_range):
    s = load_monuseg(nuclei_dir)[index]
    np_t, hv = instances_to_hv(s.inst_map)
    if noisy:
        np_t, hv = noisy_maps(np_t, hv, seed=index)
    whole, whole_tab = hv_to_instances(np_t, hv, mode=mode)
    # HoVer-Net normalises the Sobel responses per tile, so tiles see slightly different markers than
    # the whole image; with the whole image's range fixed, only the stitching itself is under test.
    # The optimus mode normalises nothing: tiles differ from the whole image only within ~10 px of their
    # (reflect-padded) edges, which the overlap and the ownership rule keep out of the result.
    rng = sobel_range(hv) if fixed_range else None
    h, w = np_t.shape
    tiles = []
    for y, x in _tiles(h, w, 256, 64):
        inst, tab = hv_to_instances(
            np_t[y : y + 256, x : x + 256], hv[:, y : y + 256, x : x + 256], mode=mode, sobel_range=rng
        )
        tiles.append(TileInstances(x0=x, y0=y, inst_map=inst, table=tab))
    table, stitched = stitch_tiles(tiles, slide_shape=(h, w))
    assert stitched is not None
    r = pq(whole, stitched)
    # duplicates: stitched instances whose pixels were overwritten by another kept instance, or
    # pairs of kept instances matching the same whole-image nucleus
    tids, pids, _ = match_instances(whole, stitched)
    painted = np.unique(stitched[stitched > 0]).size
    lost = int(whole.max()) - tids.size
    print(
        f"\nstitch {s.name} ({'noisy' if noisy else 'clean'}, {mode}, {'fixed' if fixed_range else 'per-tile'}): PQ {r.pq:.4f}, whole {int(whole.max())}, "
        f"stitched {len(table)}, unmatched whole-image nuclei {lost}, kept-but-overwritten {len(table) - painted}"
    )
    assert r.pq >= (0.97 if mode == "hovernet" and not fixed_range else 0.99)
    assert len(table) == painted  # no duplicate painted over another
    assert table.ids.tolist() == list(range(1, len(table) + 1))
    # level-0 geometry: table rows agree with the painted map
    for k in range(0, len(table), 37):
        gid = table.ids[k]
        ys, xs = np.nonzero(stitched == gid)
        if ys.size == table.areas[k]:
            assert np.allclose(table.centroids[k], (xs.mean() + 0.5, ys.mean() + 0.5))
        assert shapely.Polygon(table.contours[k]).is_valid
    # centroid-level duplicate check: no two stitched nuclei within 2 px
    c = table.centroids
    d = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1)) + np.eye(len(c)) * 1e9
    assert (d < 2).sum() == 0


def test_empty_and_single_tile():
    t, m = stitch_tiles([], slide_shape=(4, 4))
    assert len(t) == 0 and m is not None and m.max() == 0
    inst = np.zeros((8, 8), np.int32)
    inst[2:5, 2:5] = 1
    tab = instance_table(inst)
    t, m = stitch_tiles([TileInstances(10, 20, inst, tab)])
    assert len(t) == 1 and m is None
    assert np.allclose(t.centroids[0], (10 + 3.5, 20 + 3.5))
    assert tuple(t.bboxes[0]) == (12, 22, 15, 25)


def test_stitching_ground_truth_tiles_is_exact(nuclei_dir):
    """Tiles cut from the annotation itself (no post-processing): stitching must give back every
    nucleus exactly once, including those cut by tile borders."""
    from cellvit_optimus.kernels._numba import label_equal

    raw = load_monuseg(nuclei_dir)[2].inst_map
    gt = np.empty_like(raw)  # connected pieces as instances (a few MoNuSeg polygons overlap)
    label_equal(raw, gt, np.empty(raw.size + 2, np.int64))
    h, w = gt.shape
    tiles = []
    for y, x in _tiles(h, w, 256, 64):
        crop = gt[y : y + 256, x : x + 256]
        ids, inv = np.unique(crop, return_inverse=True)
        local = inv.reshape(crop.shape).astype(np.int32)  # 0 stays 0 (ids[0] == 0 here)
        assert ids[0] == 0
        tiles.append(TileInstances(x0=x, y0=y, inst_map=local, table=instance_table(local)))
    table, stitched = stitch_tiles(tiles, slide_shape=(h, w))
    r = pq(gt, stitched)
    print(f"\nstitch GT tiles: PQ {r.pq:.4f}, GT {int(gt.max())}, stitched {len(table)}")
    assert r.pq >= 0.99
    assert len(table) == np.unique(stitched[stitched > 0]).size
