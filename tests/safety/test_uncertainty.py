"""Entropy maps, HV consistency (on HV maps built from real CoNSeP instances), tile and region aggregates."""

from __future__ import annotations

import numpy as np
import pytest

from cellvit_optimus.safety import (
    aggregate_by_region,
    entropy_map,
    hv_consistency_map,
    label_regions,
    tile_uncertainty,
)


def hover_hv(inst: np.ndarray) -> np.ndarray:
    """HoVer-Net target HV maps ``(2, H, W)``: per nucleus, x and y offsets from the centroid in [-1, 1]."""
    hv = np.zeros((2,) + inst.shape, dtype=np.float32)
    yy, xx = np.mgrid[: inst.shape[0], : inst.shape[1]]
    for i in np.unique(inst)[1:]:
        m = inst == i
        for c, coord in enumerate((xx, yy)):
            d = coord[m] - coord[m].mean()
            d = np.where(d < 0, d / max(-d.min(), 1e-6), d / max(d.max(), 1e-6))
            hv[c][m] = d
    return hv


@pytest.fixture(scope="module")
def real_tile(consep_samples):
    s = consep_samples[0]
    fg = (s.inst_map > 0).astype(np.float32)
    return s, fg, hover_hv(s.inst_map)


def test_entropy_bounds():
    p = np.zeros((1, 4, 2, 2))
    p[0, 0] = 1.0
    assert np.allclose(entropy_map(p), 0.0)
    assert np.allclose(entropy_map(np.full((1, 4, 2, 2), 0.25)), 1.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        entropy_map(np.ones((1, 1, 2, 2)))


def test_hv_consistency_real_instances(real_tile):
    s, fg, hv = real_tile
    good = hv_consistency_map(hv)
    score_good = (good * fg).sum() / fg.sum()
    rng = np.random.default_rng(0)
    noisy = rng.uniform(-1, 1, size=hv.shape).astype(np.float32)
    score_noise = (hv_consistency_map(noisy) * fg).sum() / fg.sum()
    flipped = hv.copy()
    flipped[0] *= -1  # horizontal map mirrored: decreasing across every nucleus
    score_flip = (hv_consistency_map(flipped) * fg).sum() / fg.sum()
    assert score_good > 0.95 and score_noise < 0.65 and score_flip < 0.3, (score_good, score_noise, score_flip)


def test_tile_uncertainty_confident_vs_uncertain(real_tile):
    s, fg, hv = real_tile
    sharp = np.stack([1 - fg, fg])[None] * 0.98 + 0.01
    types = np.eye(4, dtype=np.float32)[np.clip(s.type_map - 1, 0, 3)].transpose(2, 0, 1)[None] * 0.97 + 0.0075
    flat = np.full((1, 2) + fg.shape, 0.5, dtype=np.float32)
    flat_t = np.full((1, 4) + fg.shape, 0.25, dtype=np.float32)
    u = tile_uncertainty(np.concatenate([sharp, flat]), np.concatenate([types, flat_t]),
                         np.concatenate([hv[None], np.zeros_like(hv)[None]]))
    assert u.np_entropy[0] < 0.2 < 0.99 < u.np_entropy[1]
    assert u.nt_entropy[0] < 0.2 < 0.99 < u.nt_entropy[1]
    assert u.hv_consistency[0] > 0.9
    assert 0 < u.nucleus_fraction[0] < 1
    empty = tile_uncertainty(np.stack([np.ones_like(fg), np.zeros_like(fg)])[None], hv=hv[None])
    assert np.isnan(empty.hv_consistency[0])  # no nuclei: not judged
    with pytest.raises(ValueError, match="does not match"):
        tile_uncertainty(sharp, hv=hv[None, :, :10])


def test_label_regions_and_aggregate():
    coords = np.array([[0, 0], [512, 0], [1024, 0], [4096, 4096], [4608, 4608], [0, 512]])
    r = label_regions(coords, 512)
    assert r.tolist() == [0, 0, 0, 1, 1, 0]
    assert label_regions(coords, 256).tolist() == [0, 1, 2, 3, 4, 5]  # stride 256: gaps between tiles
    v = np.array([1.0, 2.0, 3.0, 10.0, np.nan, 6.0])
    assert aggregate_by_region(v, r).tolist() == [3.0, 10.0]
    assert aggregate_by_region(v, r, "max").tolist() == [6.0, 10.0]
    assert label_regions(np.zeros((0, 2)), 512).size == 0
