"""Tissue detection, pen-mark rejection, the tile grid at a target resolution, and tile quality.

Works on a low-resolution thumbnail (default 8 um/px): tissue is what is stained (HSV saturation
above an Otsu threshold, clamped to a floor so a blank slide does not split its own noise), minus pen
ink (saturated green to blue hues, which H&E never produces: haematoxylin sits at 260-300 degrees,
eosin at 300-350) and minus near-black scanner artefacts, cleaned with morphology. The grid tiles the
slide in level-0 pixels at ``target_mpp``; a tile is kept when the tissue fraction of its footprint
reaches ``min_tissue_fraction``. Each kept tile carries its tissue and pen/artefact fractions; the
blur score (variance of the Laplacian) is computed on the tile itself when it is read
(:func:`tile_quality`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cellvit_optimus.engine.errors import ConfigError, NoTissueError
from cellvit_optimus.engine.settings import MIN_TISSUE_FRACTION

if TYPE_CHECKING:
    from cellvit_optimus.engine.wsi.slide import Slide

__all__ = ("TissueConfig", "TilingConfig", "TissueMask", "TileGrid", "detect_tissue", "tile_grid",
           "tile_quality", "draw_overlay")


@dataclass(frozen=True)
class TissueConfig:
    """how tissue is told from background, pen and artefacts"""

    thumbnail_mpp: float = 4.0
    max_thumbnail_side: int = 2048
    min_saturation: float = 0.08  # floor of the Otsu threshold (fraction of full scale)
    max_saturation_threshold: float = 0.25
    reject_pen: bool = True
    pen_hue_range: tuple[float, float] = (75.0, 255.0)  # degrees: green, cyan, blue
    pen_min_saturation: float = 0.35
    pen_min_component_um2: float = 5_000.0  # ink strokes are large; bluish haematoxylin specks are not
    pen_dilation_um: float = 24.0  # ink halos and ink edges around a stroke
    dark_value: float = 0.12  # near-black (value below this) is an artefact, not tissue
    min_component_um2: float = 20_000.0  # drop specks smaller than ~140x140 um
    closing_um: float = 32.0

    def __post_init__(self) -> None:
        if self.thumbnail_mpp <= 0:
            raise ConfigError(f"thumbnail_mpp={self.thumbnail_mpp} must be > 0")
        if not 0 <= self.min_saturation <= self.max_saturation_threshold <= 1:
            raise ConfigError(f"need 0 <= min_saturation ({self.min_saturation}) <= "
                              f"max_saturation_threshold ({self.max_saturation_threshold}) <= 1")
        lo, hi = self.pen_hue_range
        if not 0 <= lo < hi <= 360:
            raise ConfigError(f"pen_hue_range={self.pen_hue_range} must be increasing degrees in [0, 360]")


@dataclass(frozen=True)
class TilingConfig:
    """the tile grid: size and resolution of the tiles the backbone sees"""

    tile_size: int = 224
    target_mpp: float = 0.5
    overlap: float = 0.0  # fraction of the tile shared with the next one
    min_tissue_fraction: float = MIN_TISSUE_FRACTION

    def __post_init__(self) -> None:
        if self.tile_size < 16:
            raise ConfigError(f"tile_size={self.tile_size} must be >= 16 pixels")
        if not 0.01 <= self.target_mpp <= 50:
            raise ConfigError(f"target_mpp={self.target_mpp} outside 0.01..50 um/px")
        if not 0 <= self.overlap < 0.9:
            raise ConfigError(f"overlap={self.overlap} must be in [0, 0.9)")
        if not 0 <= self.min_tissue_fraction <= 1:
            raise ConfigError(f"min_tissue_fraction={self.min_tissue_fraction} must be in [0, 1]")


@dataclass
class TissueMask:
    """boolean masks at thumbnail resolution and the scale back to level 0"""

    tissue: np.ndarray  # (h, w) bool
    pen: np.ndarray  # (h, w) bool
    thumbnail: np.ndarray  # (h, w, 3) uint8
    downsample: tuple[float, float]  # level-0 pixels per thumbnail pixel (x, y)
    saturation_threshold: float

    @property
    def tissue_fraction(self) -> float:
        return float(self.tissue.mean())


@dataclass
class TileGrid:
    """kept tiles of one slide; coordinates are top-left corners in level-0 pixels"""

    coords: np.ndarray  # (N, 2) int64, (x, y)
    grid_index: np.ndarray  # (N, 2) int64, (column, row) on the tile lattice
    tissue_fraction: np.ndarray  # (N,) float32
    artefact_fraction: np.ndarray  # (N,) float32, pen + dark artefacts within the footprint
    tile_size: int
    target_mpp: float
    level0_size: tuple[int, int]  # footprint (w, h) in level-0 pixels
    stride: tuple[int, int]  # level-0 pixels between neighbouring tiles
    slide_dimensions: tuple[int, int]
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _rgb_to_hsv(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hue in degrees, saturation and value in [0, 1] (Pillow's C conversion; hue in 1.4 degree steps)"""
    from PIL import Image

    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("HSV"))
    scale = np.float32(1 / 255)
    return hsv[..., 0] * np.float32(360 / 255), hsv[..., 1] * scale, hsv[..., 2] * scale


def _dilate(m: np.ndarray, radius: int) -> np.ndarray:
    """binary dilation by a Euclidean disk of ``radius``: O(N) through the distance transform"""
    from scipy import ndimage as ndi

    if radius <= 0 or not m.any():
        return m
    return ndi.distance_transform_edt(~m) <= radius


def _erode(m: np.ndarray, radius: int) -> np.ndarray:
    """binary erosion by a Euclidean disk (pixels beyond the array count as foreground)"""
    from scipy import ndimage as ndi

    if radius <= 0 or m.all():
        return m
    return ndi.distance_transform_edt(m) > radius


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    if hist.sum() == 0:
        return 1.0
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def detect_tissue(slide: Slide, config: TissueConfig | None = None) -> TissueMask:
    """tissue and pen masks of ``slide`` at about ``config.thumbnail_mpp``"""
    from scipy import ndimage as ndi

    cfg = config or TissueConfig()
    W, H = slide.dimensions
    mx, _ = slide.require_mpp()
    side = int(min(cfg.max_thumbnail_side, max(W, H) * mx / cfg.thumbnail_mpp))
    thumb = slide.thumbnail(max(64, min(side, max(W, H))))
    th, tw = thumb.shape[:2]
    down = (W / tw, H / th)
    um_per_px = mx * down[0]

    hue, sat, val = _rgb_to_hsv(thumb)
    thr = float(np.clip(_otsu(sat.ravel()), cfg.min_saturation, cfg.max_saturation_threshold))
    stained = sat >= thr
    dark = val < cfg.dark_value
    pen = np.zeros_like(stained)
    if cfg.reject_pen:
        lo, hi = cfg.pen_hue_range
        pen = (hue >= lo) & (hue <= hi) & (sat >= cfg.pen_min_saturation)
        pen = ndi.binary_opening(pen, structure=_disk(1))
        pen = _drop_small(pen, cfg.pen_min_component_um2 / um_per_px ** 2)
        pen = _dilate(pen, int(round(cfg.pen_dilation_um / um_per_px)))
    tissue = stained & ~pen & ~dark
    close = int(round(cfg.closing_um / um_per_px))
    if close > 0:
        # pad with the edge so closing does not eat tissue that touches the slide border
        padded = np.pad(tissue, close, mode="edge")
        tissue = _erode(_dilate(padded, close), close)[close:-close, close:-close]
    tissue = ndi.binary_fill_holes(tissue) & ~pen
    tissue = ndi.binary_opening(tissue, structure=_disk(1))
    tissue = _drop_small(tissue, cfg.min_component_um2 / um_per_px ** 2)
    return TissueMask(tissue=tissue, pen=pen | dark, thumbnail=thumb, downsample=down,
                      saturation_threshold=thr)


def _drop_small(m: np.ndarray, min_pixels: float) -> np.ndarray:
    from scipy import ndimage as ndi

    labels, n = ndi.label(m)
    if not n:
        return m
    keep = np.zeros(n + 1, bool)
    keep[1:] = np.bincount(labels.ravel())[1:] >= min_pixels
    return keep[labels]


def tile_grid(slide: Slide, tiling: TilingConfig | None = None, tissue: TissueConfig | None = None,
              mask: TissueMask | None = None, require_tissue: bool = True) -> TileGrid:
    """the tiles of ``slide`` at ``tiling.target_mpp`` that pass the tissue threshold

    Raises :class:`NoTissueError` when none does (unless ``require_tissue`` is False).
    """
    cfg = tiling or TilingConfig()
    mask = mask or detect_tissue(slide, tissue)
    W, H = slide.dimensions
    w0, h0 = slide.level0_tile_size(cfg.tile_size, cfg.target_mpp)
    sx, sy = max(1, round(w0 * (1 - cfg.overlap))), max(1, round(h0 * (1 - cfg.overlap)))
    cols = max(1, math.ceil((W - w0) / sx) + 1) if W > w0 else 1
    rows = max(1, math.ceil((H - h0) / sy) + 1) if H > h0 else 1
    xs = np.arange(cols, dtype=np.int64) * sx
    ys = np.arange(rows, dtype=np.int64) * sy

    tissue_frac = _box_means(mask.tissue, xs, ys, w0, h0, mask.downsample)
    art_frac = _box_means(mask.pen, xs, ys, w0, h0, mask.downsample)
    keep = tissue_frac >= max(cfg.min_tissue_fraction, 1e-9)
    r_idx, c_idx = np.nonzero(keep)  # row-major order: stable, reproducible tile order
    coords = np.stack([xs[c_idx], ys[r_idx]], axis=1).astype(np.int64)
    grid = TileGrid(coords=coords.reshape(-1, 2), grid_index=np.stack([c_idx, r_idx], 1).astype(np.int64),
                    tissue_fraction=tissue_frac[keep].astype(np.float32),
                    artefact_fraction=art_frac[keep].astype(np.float32), tile_size=cfg.tile_size,
                    target_mpp=cfg.target_mpp, level0_size=(w0, h0), stride=(sx, sy),
                    slide_dimensions=(W, H))
    if require_tissue and len(grid) == 0:
        raise NoTissueError(slide.path, f"no {cfg.tile_size}px tile at {cfg.target_mpp} um/px has "
                            f">= {cfg.min_tissue_fraction:.0%} tissue (slide tissue fraction "
                            f"{mask.tissue_fraction:.2%})")
    return grid


def _box_means(m: np.ndarray, xs: np.ndarray, ys: np.ndarray, w0: int, h0: int,
               down: tuple[float, float]) -> np.ndarray:
    """mean of boolean mask ``m`` over each tile footprint (rows of ys x columns of xs)"""
    h, w = m.shape
    ii = np.zeros((h + 1, w + 1), np.float64)
    ii[1:, 1:] = np.cumsum(np.cumsum(m, 0), 1)
    x0 = np.clip(np.floor(xs / down[0]).astype(int), 0, w)
    x1 = np.clip(np.ceil((xs + w0) / down[0]).astype(int), 0, w)
    y0 = np.clip(np.floor(ys / down[1]).astype(int), 0, h)
    y1 = np.clip(np.ceil((ys + h0) / down[1]).astype(int), 0, h)
    # footprint area counted in full, so the part beyond the slide edge counts as background
    full_w = np.maximum(np.ceil(w0 / down[0]), 1)
    full_h = np.maximum(np.ceil(h0 / down[1]), 1)
    s = (ii[y1][:, x1] - ii[y0][:, x1] - ii[y1][:, x0] + ii[y0][:, x0])
    return s / (full_w * full_h)


def tile_quality(tiles: Any) -> dict[str, np.ndarray]:
    """per-tile quality of (N, h, w, 3) uint8 tiles (numpy, or a torch tensor on any device: computed
    there, so tiles decoded on the GPU never come back to the host)

    Returns ``blur`` (variance of the 4-neighbour Laplacian of the grey image: low means out of
    focus), ``background`` (fraction of near-white pixels) and ``dark`` (fraction of near-black).
    """
    if type(tiles).__module__.startswith("torch"):
        return _tile_quality_torch(tiles)
    t = np.asarray(tiles)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ConfigError(f"tiles must be (N, h, w, 3), got shape {t.shape}")
    grey = t.astype(np.float32) @ _GREY
    lap = (grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] + grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1]
           - 4 * grey[:, 1:-1, 1:-1])
    return {
        "blur": lap.reshape(len(t), -1).var(axis=1).astype(np.float32),
        "background": (grey > 220).reshape(len(t), -1).mean(1).astype(np.float32),
        "dark": (grey < 30).reshape(len(t), -1).mean(1).astype(np.float32),
    }


def _tile_quality_torch(t: Any) -> dict[str, np.ndarray]:
    import torch

    if t.ndim != 4 or t.shape[-1] != 3:
        raise ConfigError(f"tiles must be (N, h, w, 3), got shape {tuple(t.shape)}")
    n = int(t.shape[0])
    with torch.inference_mode():
        grey = t.float() @ torch.from_numpy(_GREY).to(t.device)
        lap = (grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] + grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1]
               - 4 * grey[:, 1:-1, 1:-1])
        out = torch.stack([lap.reshape(n, -1).var(dim=1, correction=0),
                           (grey > 220).reshape(n, -1).float().mean(1),
                           (grey < 30).reshape(n, -1).float().mean(1)]).cpu().numpy()
    return {"blur": out[0], "background": out[1], "dark": out[2]}


_GREY = np.array([0.299, 0.587, 0.114], np.float32)


def draw_overlay(mask: TissueMask, grid: TileGrid | None = None, alpha: float = 0.35) -> np.ndarray:
    """thumbnail with tissue (green tint), pen/artefacts (red tint) and kept tile outlines (blue)"""
    img = mask.thumbnail.astype(np.float32).copy()
    for m, colour in ((mask.tissue, (0, 200, 0)), (mask.pen, (230, 0, 0))):
        img[m] = (1 - alpha) * img[m] + alpha * np.array(colour, np.float32)
    out = img.clip(0, 255).astype(np.uint8)
    if grid is not None and len(grid):
        h, w = out.shape[:2]
        dx, dy = mask.downsample
        for x, y in grid.coords:
            x0, y0 = int(x / dx), int(y / dy)
            x1 = min(int((x + grid.level0_size[0]) / dx), w - 1)
            y1 = min(int((y + grid.level0_size[1]) / dy), h - 1)
            if x0 >= w or y0 >= h:
                continue
            out[y0, x0:x1 + 1] = out[y1, x0:x1 + 1] = (30, 60, 220)
            out[y0:y1 + 1, x0] = out[y0:y1 + 1, x1] = (30, 60, 220)
    return out
