"""Tissue detection + tile grid beside a plain baseline, in MP/s of thumbnail processed.

- ours: :func:`tile_grid` (HSV-saturation Otsu with a floor, pen and dark-artefact rejection,
  distance-transform morphology, integral-image tile fractions)
- baseline: the common recipe (histolab / many notebooks): Otsu on the grey thumbnail, scikit-image
  disk closing, small-object removal and hole filling, then the tissue fraction of each tile footprint
  in a Python loop over the grid

Groups: ``tissue-<slide>`` on the real slides (the thumbnail read is included, as in a run) and
``tissue-2k-thumbnail``: a 2048 px thumbnail of real tissue (the CMU region mirrored 2x2, the
thumbnail size of a large slide at the default settings), processing only. ``extra_info`` also holds
the baseline's tissue-mask IoU with ours (the baseline finds pen ink and glass edges as "tissue").
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchutil import record
from cellvit_optimus.engine.wsi.slide import open_slide
from cellvit_optimus.engine.wsi.tissue import TilingConfig, TissueConfig, detect_tissue, tile_grid

SLIDES = {"cmu": ("cmu-1-small-region.svs", None), "prostate": ("prostate-small.dcm", None)}


def baseline_mask(thumb: np.ndarray, um_per_px: float, cfg: TissueConfig) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.color import rgb2gray
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, disk, remove_small_objects

    grey = rgb2gray(thumb)
    tissue = grey < threshold_otsu(grey)
    tissue = closing(tissue, disk(max(1, round(cfg.closing_um / um_per_px))))
    tissue = remove_small_objects(tissue, max_size=int(cfg.min_component_um2 / um_per_px**2))
    return ndi.binary_fill_holes(tissue)


def baseline_grid(slide, tiling: TilingConfig, cfg: TissueConfig) -> tuple[np.ndarray, np.ndarray]:
    """(kept coords, mask) with the baseline recipe and a per-tile loop"""
    W, H = slide.dimensions
    mx, _ = slide.require_mpp()
    side = int(min(cfg.max_thumbnail_side, max(W, H) * mx / cfg.thumbnail_mpp))
    thumb = slide.thumbnail(max(64, min(side, max(W, H))))
    down = W / thumb.shape[1], H / thumb.shape[0]
    mask = baseline_mask(thumb, mx * down[0], cfg)
    w0, h0 = slide.level0_tile_size(tiling.tile_size, tiling.target_mpp)
    kept = []
    for y in range(0, H - h0 + 1 if H > h0 else 1, h0):
        for x in range(0, W - w0 + 1 if W > w0 else 1, w0):
            y0, y1 = int(y / down[1]), int(math.ceil((y + h0) / down[1]))
            x0, x1 = int(x / down[0]), int(math.ceil((x + w0) / down[0]))
            if mask[y0:y1, x0:x1].mean() >= tiling.min_tissue_fraction:
                kept.append((x, y))
    return np.array(kept).reshape(-1, 2), mask


class _ImageSlide:
    """a slide-like view of an in-memory image whose thumbnails are precomputed (processing-only timing)"""

    path = "tissue-2k.bench"

    def __init__(self, image: np.ndarray, mpp: float, thumb_sides: tuple[int, ...]) -> None:
        from PIL import Image

        self.image = image
        self.dimensions = (image.shape[1], image.shape[0])
        self.mpp = (mpp, mpp)
        W, H = self.dimensions
        self._thumbs = {}
        for side in thumb_sides:
            s = max(W, H) / side
            self._thumbs[side] = np.asarray(
                Image.fromarray(image).resize((round(W / s), round(H / s)), Image.Resampling.BOX))

    def require_mpp(self):
        return self.mpp

    def thumbnail(self, max_size: int) -> np.ndarray:
        return self._thumbs[max_size]

    def level0_tile_size(self, tile_size: int, target_mpp: float) -> tuple[int, int]:
        return (round(tile_size * target_mpp / self.mpp[0]),) * 2  # type: ignore[return-value]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("impl", ["optimus", "baseline-grey-otsu"])
@pytest.mark.parametrize("name", list(SLIDES))
def test_tissue_real_slide(benchmark, slides_dir, name, impl):
    benchmark.group = f"tissue-{name}"
    cfg, tiling = TissueConfig(), TilingConfig()
    slide = open_slide(slides_dir / SLIDES[name][0])
    if impl == "optimus":
        grid = benchmark.pedantic(lambda: tile_grid(slide, tiling, cfg), rounds=5, warmup_rounds=1)
        n, mask = len(grid), detect_tissue(slide, cfg)
        mp = mask.thumbnail.shape[0] * mask.thumbnail.shape[1] / 1e6
        benchmark.extra_info["tissue_fraction"] = round(mask.tissue_fraction, 4)
    else:
        coords, m = benchmark.pedantic(lambda: baseline_grid(slide, tiling, cfg), rounds=5, warmup_rounds=1)
        n, mp = len(coords), m.size / 1e6
        benchmark.extra_info["iou_with_optimus"] = round(_iou(m, detect_tissue(slide, cfg).tissue), 3)
    benchmark.extra_info.update(impl=impl, slide=SLIDES[name][0], tiles_kept=n)
    record(benchmark, mp=round(mp, 4))
    assert n > 0


@pytest.fixture(scope="module")
def big_slide(slides_dir):
    with open_slide(slides_dir / "cmu-1-small-region.svs") as s:
        W, H = s.dimensions
        img = s.read_region((0, 0), 0, (W, H))
    img = np.concatenate([img, img[:, ::-1]], axis=1)
    img = np.concatenate([img, img[::-1]], axis=0)  # 4440 x 5934 of real tissue, seamless mirrors
    cfg = TissueConfig()
    mpp = cfg.max_thumbnail_side * cfg.thumbnail_mpp / max(img.shape[:2])  # thumbnail side exactly 2048
    return _ImageSlide(img, mpp, (cfg.max_thumbnail_side,))


@pytest.mark.benchmark(group="tissue-2k-thumbnail")
@pytest.mark.parametrize("impl", ["optimus", "baseline-grey-otsu"])
def test_tissue_2k_thumbnail(benchmark, big_slide, impl):
    cfg, tiling = TissueConfig(), TilingConfig()
    thumb = big_slide.thumbnail(cfg.max_thumbnail_side)
    if impl == "optimus":
        grid = benchmark.pedantic(lambda: tile_grid(big_slide, tiling, cfg), rounds=3, warmup_rounds=1)
        n = len(grid)
    else:
        coords, m = benchmark.pedantic(lambda: baseline_grid(big_slide, tiling, cfg), rounds=3, warmup_rounds=1)
        n = len(coords)
        benchmark.extra_info["iou_with_optimus"] = round(_iou(m, detect_tissue(big_slide, cfg).tissue), 3)
    benchmark.extra_info.update(impl=impl, thumbnail=list(thumb.shape[:2]), tiles_kept=n)
    record(benchmark, mp=round(thumb.shape[0] * thumb.shape[1] / 1e6, 4))
    assert n > 0
