"""Tissue detection against regions drawn by hand on the real slides' thumbnails.

The boxes below were drawn by looking at each slide's thumbnail with a 2-5 % grid over it
(fractions of the slide's width and height: x0, x1, y0, y1). The overlays under
tests/engine/wsi/overlays/ show the detected tissue (green), pen/artefacts (red), kept tiles (blue
outlines) and these boxes (yellow = background, cyan = tissue, magenta = pen). Regenerate them with
``OPTIMUS_WRITE_OVERLAYS=1 pytest tests/engine/wsi/test_tissue.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cellvit_optimus.engine import NoTissueError
from cellvit_optimus.engine.wsi.slide import open_slide
from cellvit_optimus.engine.wsi.tissue import (
    TilingConfig,
    TissueConfig,
    detect_tissue,
    draw_overlay,
    tile_grid,
    tile_quality,
)

OVERLAYS = Path(__file__).parent / "overlays"

# slide -> (mpp override, {"background": [...], "tissue": [...], "pen": [...]})
REGIONS = {
    "cmu-1-small-region.svs": (None, {
        "background": [(0.0, 0.2, 0.45, 1.0), (0.0, 0.33, 0.0, 0.28), (0.88, 1.0, 0.55, 1.0)],
        "tissue": [(0.35, 0.62, 0.62, 0.95), (0.45, 0.62, 0.20, 0.40)],
        "pen": [],
    }),
    "tcga-cr-7395-01a-01-ts1.svs": (0.5, {
        "background": [(0.0, 0.1, 0.0, 0.25), (0.0, 0.15, 0.88, 1.0), (0.88, 1.0, 0.0, 0.12)],
        "tissue": [(0.15, 0.55, 0.30, 0.75), (0.70, 0.90, 0.65, 0.85)],
        "pen": [],
    }),
    "prostate-small.dcm": (None, {
        "background": [(0.0, 0.08, 0.55, 1.0), (0.0, 0.25, 0.78, 1.0), (0.35, 0.60, 0.0, 0.03),
                       (0.53, 0.63, 0.60, 0.74)],
        "tissue": [(0.10, 0.18, 0.30, 0.42), (0.70, 0.85, 0.62, 0.85), (0.25, 0.35, 0.32, 0.42)],
        # on the green and blue ink strokes, several of them crossing tissue
        "pen": [(0.30, 0.36, 0.028, 0.040), (0.71, 0.74, 0.20, 0.215), (0.555, 0.565, 0.335, 0.345),
                (0.835, 0.855, 0.29, 0.31)],
    }),
}


def _boxes_px(boxes, W, H):
    return [(x0 * W, x1 * W, y0 * H, y1 * H) for x0, x1, y0, y1 in boxes]


def _inside(coords, box, w0, h0, W, H):
    """tiles whose footprint (clipped to the slide: beyond it is background) lies inside ``box``"""
    x0, x1, y0, y1 = box
    return [(x, y) for x, y in coords
            if x >= x0 and min(x + w0, W) <= x1 and y >= y0 and min(y + h0, H) <= y1]


def _lattice(grid):
    """every lattice position of the grid, kept or not (top-left corners, level-0 pixels)"""
    W, H = grid.slide_dimensions
    sx, sy = grid.stride
    return [(x, y) for y in range(0, H, sy) for x in range(0, W, sx)]


def _write_overlay(name, mask, grid, regions, W, H):
    from PIL import Image, ImageDraw

    img = Image.fromarray(draw_overlay(mask, grid))
    if max(img.size) > 1000:  # keep the committed PNGs small
        k = 1000 / max(img.size)
        img = img.resize((round(img.size[0] * k), round(img.size[1] * k)), Image.Resampling.LANCZOS)
    d = ImageDraw.Draw(img)
    sx, sy = img.size[0] / W, img.size[1] / H
    colours = {"background": (250, 220, 0), "tissue": (0, 220, 230), "pen": (230, 0, 230)}
    for kind, boxes in regions.items():
        for x0, x1, y0, y1 in _boxes_px(boxes, W, H):
            d.rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], outline=colours[kind], width=2)
    OVERLAYS.mkdir(exist_ok=True)
    img.save(OVERLAYS / f"{name}.png")


@pytest.mark.parametrize("name", sorted(REGIONS))
def test_tissue_matches_hand_drawn_regions(slides_dir, name):
    mpp, regions = REGIONS[name]
    slide = open_slide(slides_dir / name, mpp=mpp)
    tiling = TilingConfig()
    mask = detect_tissue(slide)
    grid = tile_grid(slide, tiling, mask=mask)
    W, H = slide.dimensions
    w0, h0 = grid.level0_size
    kept = {tuple(c) for c in grid.coords.tolist()}
    coords = _lattice(grid)
    if os.environ.get("OPTIMUS_WRITE_OVERLAYS"):
        _write_overlay(name, mask, grid, regions, W, H)

    for box in _boxes_px(regions["background"], W, H):
        inside = _inside(coords, box, w0, h0, W, H)
        assert inside, f"{name}: background box {box} holds no whole tile"
        wrongly_kept = [t for t in inside if t in kept]
        assert not wrongly_kept, f"{name}: {len(wrongly_kept)}/{len(inside)} background tiles in {box} kept"

    for box in _boxes_px(regions["tissue"], W, H):
        inside = _inside(coords, box, w0, h0, W, H)
        assert inside, f"{name}: tissue box {box} holds no whole tile"
        frac = np.mean([t in kept for t in inside])
        # gland lumina inside tissue may be dropped legitimately; nearly all of it must be kept
        assert frac >= 0.9, f"{name}: only {frac:.0%} of tissue tiles in {box} kept"

    for x0, x1, y0, y1 in _boxes_px(regions["pen"], W, H):
        on_ink = [(x, y) for x, y in coords if x0 <= x + w0 / 2 <= x1 and y0 <= y + h0 / 2 <= y1]
        assert on_ink, f"{name}: pen box {(x0, x1, y0, y1)} has no tile centre"
        wrongly_kept = [t for t in on_ink if t in kept]
        assert not wrongly_kept, f"{name}: {len(wrongly_kept)}/{len(on_ink)} tiles on pen ink kept"


def test_pen_detected_only_where_there_is_ink(slides_dir):
    pen_slide = detect_tissue(open_slide(slides_dir / "prostate-small.dcm"))
    clean = detect_tissue(open_slide(slides_dir / "cmu-1-small-region.svs"))
    assert pen_slide.pen.mean() > 0.05  # the strokes cover a visible part of the prostate slide
    assert clean.pen.mean() < 0.005


def test_blank_slide_has_no_tissue(slides_dir):
    slide = open_slide(slides_dir / "kidney-48-5.tif", mpp=0.5)
    mask = detect_tissue(slide)
    assert mask.tissue.sum() == 0
    with pytest.raises(NoTissueError, match="kidney-48-5.tif: no tissue"):
        tile_grid(slide, mask=mask)


def test_grid_geometry_follows_target_mpp(slides_dir):
    slide = open_slide(slides_dir / "cmu-1-small-region.svs")  # 0.499 um/px
    g5 = tile_grid(slide, TilingConfig(target_mpp=0.5))
    g1 = tile_grid(slide, TilingConfig(target_mpp=1.0))
    assert g5.level0_size == (224, 224)  # 224 * 0.5 / 0.499 = 224.4 -> 224
    assert g1.level0_size == (449, 449)
    assert g1.stride == (449, 449)
    go = tile_grid(slide, TilingConfig(target_mpp=0.5, overlap=0.25))
    assert go.stride == (168, 168)
    assert len(go) > len(g5) > len(g1) > 0
    # coordinates are on the lattice and inside the slide
    assert (g5.coords % 224 == 0).all()
    assert (g5.coords[:, 0] < slide.dimensions[0]).all() and (g5.coords[:, 1] < slide.dimensions[1]).all()


def test_tile_quality_tells_blur_and_background(slides_dir):
    from PIL import Image, ImageFilter

    slide = open_slide(slides_dir / "cmu-1-small-region.svs")
    grid = tile_grid(slide)
    best = int(np.argmax(grid.tissue_fraction))
    sharp = slide.read_tiles([tuple(grid.coords[best])])
    blurred = np.asarray(Image.fromarray(sharp[0]).filter(ImageFilter.GaussianBlur(3)))[None]
    glass = slide.read_tiles([(0, 2700)])  # bottom-left corner: glass
    q = tile_quality(np.concatenate([sharp, blurred, glass]))
    assert q["blur"][0] > 5 * q["blur"][1]
    assert q["background"][2] > 0.9 > q["background"][0]


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="overlap=0.95"):
        TilingConfig(overlap=0.95)
    with pytest.raises(ValueError, match="target_mpp=0"):
        TilingConfig(target_mpp=0)
    with pytest.raises(ValueError, match="pen_hue_range"):
        TissueConfig(pen_hue_range=(200, 100))
