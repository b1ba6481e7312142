"""Real tiles for the out-of-domain evaluation, as the triage engine sees them (224 px at 0.5 um/px).

Shared by ``tests/safety/test_ood_model.py``, ``bench/eval_ood.py`` (AUROC per shift type) and
``bench/fit_default_ood.py`` (the bundled OOD state). Plain numpy / Pillow / scipy plus the engine's
slide readers and tissue detection, so every tile comes from real pixels:

in-domain H&E (each tile carries a *group*: the image, or a quadrant of a slide)
    ``monuseg``   the 13 MoNuSeg training images and the TIAToolbox target image (TCGA, 7 organs, 40x),
                  box-downsampled to 0.5 um/px and tiled 3 x 3 (224 px tiles, stride 138)
    ``cmu1``      CMU-1-Small-Region (Aperio, 20x) tissue tiles of the engine's grid
    ``tcga_fs``   the TCGA frozen section (JPEG 2000, read at 0.25 um/px as the tests do) tissue tiles

shifts
    ``ihc``               scikit-image's real IHC image (DAB + haematoxylin, colon), tiled with stride 32
    ``blur_s{1,2,4}``     Gaussian blur (sigma in px at 0.5 um/px) of held-out in-domain tiles
    ``pen_dicom``         tiles of prostate-small.dcm whose footprint is mostly pen ink (the tissue
                          detector's pen mask), read as the engine reads them (4.6 -> 0.5 um/px)
    ``pen_ink_transfer``  held-out in-domain tiles under real ink: the DICOM's pen-ink optical density
                          and stroke-edge geometry added in OD space (ink absorbs on top of the stain)
    ``non_tissue``        background tiles (tissue fraction 0) of CMU-1, the TCGA slide and kidney-48-5.tif
    ``prostate_dicom``    tissue tiles of prostate-small.dcm (another scanner at 4.6 um/px, so upsampled
                          ~9x by the engine), pen-free
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TILE = 224
MPP = 0.5
#: the engine's default tile overlap at the nuclei resolution (TriageConfig.overlap_px)
OVERLAP_PX = 64
SLIDE_MPP = {"tcga-cr-7395-01a-01-ts1.svs": 0.25, "kidney-48-5.tif": 0.5}


@dataclass
class TileSet:
    """tiles ``(N, 224, 224, 3)`` uint8 with a group and a source per tile"""

    tiles: np.ndarray
    groups: np.ndarray
    sources: np.ndarray
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    def take(self, sel: np.ndarray) -> TileSet:
        return TileSet(self.tiles[sel], self.groups[sel], self.sources[sel])

    @staticmethod
    def concat(parts: list[TileSet]) -> TileSet:
        parts = [p for p in parts if len(p)]
        return TileSet(np.concatenate([p.tiles for p in parts]), np.concatenate([p.groups for p in parts]),
                       np.concatenate([p.sources for p in parts]))


def _subsample(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def _grid_tiles(path: Path, *, tissue: bool = True, max_tiles: int | None = None, seed: int = 0,
                pen: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """tiles of the engine's tissue grid, or its pen tiles (pen/artefact fraction >= 0.6), or the
    background tiles of the same lattice (tissue and pen fractions below 0.02); returns tiles,
    level-0 coordinates and the slide's dimensions"""
    from cellvit_optimus.engine.wsi.slide import open_slide
    from cellvit_optimus.engine.wsi.tissue import TilingConfig, _box_means, detect_tissue, tile_grid

    tiling = TilingConfig(tile_size=TILE, target_mpp=MPP, overlap=OVERLAP_PX / TILE)
    with open_slide(path, mpp=SLIDE_MPP.get(path.name)) as s:
        mask = detect_tissue(s)
        if tissue and not pen:
            coords = tile_grid(s, tiling, mask=mask, require_tissue=False).coords
        else:  # the same lattice as tile_grid, before its tissue threshold
            W, H = s.dimensions
            w0, h0 = s.level0_tile_size(TILE, MPP)
            sx, sy = max(1, round(w0 * (1 - tiling.overlap))), max(1, round(h0 * (1 - tiling.overlap)))
            xs = np.arange(max(1, -(-(W - w0) // sx) + 1) if W > w0 else 1) * sx
            ys = np.arange(max(1, -(-(H - h0) // sy) + 1) if H > h0 else 1) * sy
            tf = _box_means(mask.tissue, xs, ys, w0, h0, mask.downsample)
            af = _box_means(mask.pen, xs, ys, w0, h0, mask.downsample)
            keep = (af >= 0.6) if pen else ((tf < 0.02) & (af < 0.02))
            r, c = np.nonzero(keep)
            coords = np.stack([xs[c], ys[r]], 1).astype(np.int64).reshape(-1, 2)
        if max_tiles is not None:
            coords = coords[_subsample(len(coords), max_tiles, seed)]
        tiles = s.read_tiles([tuple(c) for c in coords.tolist()], TILE, MPP) if len(coords) else \
            np.zeros((0, TILE, TILE, 3), np.uint8)
        return tiles, coords, s.dimensions


def _quadrant_groups(name: str, coords: np.ndarray, dims: tuple[int, int], w0: float) -> np.ndarray:
    cx = coords[:, 0] + w0 / 2
    cy = coords[:, 1] + w0 / 2
    q = (cx >= dims[0] / 2).astype(int) + 2 * (cy >= dims[1] / 2).astype(int)
    return np.array([f"{name}/q{k}" for k in q])


def _downsample(img: np.ndarray, mpp: float) -> np.ndarray:
    from PIL import Image

    sc = mpp / MPP
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((round(w * sc), round(h * sc)), Image.Resampling.BOX))


def _tile_image(img: np.ndarray, step: int) -> np.ndarray:
    h, w = img.shape[:2]
    ys = list(range(0, h - TILE + 1, step))
    xs = list(range(0, w - TILE + 1, step))
    if ys[-1] != h - TILE:
        ys.append(h - TILE)
    if xs[-1] != w - TILE:
        xs.append(w - TILE)
    return np.stack([img[y:y + TILE, x:x + TILE] for y in ys for x in xs])


def monuseg_tiles(nuclei_dir: Path, exclude: Collection[str] = ()) -> TileSet:
    """the MoNuSeg images' tiles; ``exclude``: groups (``"monuseg/<stem>"``) never opened"""
    from PIL import Image

    imgs = sorted((nuclei_dir / "monuseg-train" / "images").glob("*.png"))
    extra = nuclei_dir / "tiles" / "tiatoolbox_target_image.png"  # MoNuSeg TCGA-38-6178, not in the 13
    tiles, groups = [], []
    for p in [*imgs, extra]:
        if not p.is_file() or f"monuseg/{p.stem}" in exclude:
            continue
        with Image.open(p) as im:
            img = _downsample(np.asarray(im.convert("RGB")), 0.2527)
        t = _tile_image(img, step=(img.shape[0] - TILE) // 2)
        tiles.append(t)
        groups += [f"monuseg/{p.stem}"] * len(t)
    t = np.concatenate(tiles)
    return TileSet(t, np.array(groups), np.array(["monuseg"] * len(t)))


def slide_tissue_tiles(slides_dir: Path, name: str, source: str, max_tiles: int | None = None) -> TileSet:
    path = slides_dir / name
    tiles, coords, dims = _grid_tiles(path, max_tiles=max_tiles)
    from cellvit_optimus.engine.wsi.slide import open_slide

    with open_slide(path, mpp=SLIDE_MPP.get(name)) as s:
        w0 = s.level0_tile_size(TILE, MPP)[0]
    return TileSet(tiles, _quadrant_groups(source, coords, dims, w0), np.array([source] * len(tiles)))


def in_domain(shared: Path, max_per_slide: int | None = None, exclude: Collection[str] = ()) -> TileSet:
    """all in-domain tiles (MoNuSeg images, CMU-1 and the TCGA frozen section); the MoNuSeg images named
    in ``exclude`` (groups, e.g. the nuclei model's held-out images) are left out unread"""
    return TileSet.concat([
        monuseg_tiles(shared / "nuclei", exclude),
        slide_tissue_tiles(shared / "slides", "cmu-1-small-region.svs", "cmu1", max_per_slide),
        slide_tissue_tiles(shared / "slides", "tcga-cr-7395-01a-01-ts1.svs", "tcga_fs", max_per_slide),
    ])


def split_reference(ts: TileSet) -> np.ndarray:
    """boolean mask of the reference (fitting) part: per source, every third group in sorted order is
    held out (MoNuSeg images 0, 3, 6, ...: 9 of 14 images fit; slide quadrants q0 and q3: 2 of 4 fit);
    the rest is the held-out in-domain test. Whole images / slide quadrants go to one side."""
    ref = np.zeros(len(ts), bool)
    for src in np.unique(ts.sources):
        gs = sorted(set(ts.groups[ts.sources == src]))
        held = set(gs[::3])  # every third group (quadrant q0 for the slides, images 0, 3, 6, ...)
        ref |= (ts.sources == src) & ~np.isin(ts.groups, list(held))
    return ref


# -- shifts ------------------------------------------------------------------------------------------
def blur(tiles: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return np.stack([np.stack([ndimage.gaussian_filter(t[..., c].astype(np.float32), sigma)
                               for c in range(3)], -1) for t in tiles]).round().clip(0, 255).astype(np.uint8)


def ihc_tiles() -> np.ndarray:
    from skimage import data

    return _tile_image(np.ascontiguousarray(data.immunohistochemistry()[..., :3]), step=32)


@functools.lru_cache(maxsize=2)
def _pen_source(slides_dir: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(optical density ``(H, W, 3)``, core-ink mask ``(H, W)``, mpp) of prostate-small.dcm at level 0."""
    from cellvit_optimus.engine.wsi.slide import open_slide
    from cellvit_optimus.engine.wsi.tissue import detect_tissue
    from PIL import Image

    with open_slide(slides_dir / "prostate-small.dcm") as s:
        W, H = s.dimensions
        img = s.read_region((0, 0), 0, (W, H))
        mask = detect_tissue(s)
        mpp = s.require_mpp()[0]
    pen = np.asarray(Image.fromarray(mask.pen.astype(np.uint8) * 255).resize((W, H), Image.Resampling.NEAREST)) > 0
    # the detector's pen mask is dilated around strokes: keep its saturated green-to-blue pixels
    rgb = img.astype(np.float64)
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1)
    core = pen & (sat > 0.35) & (rgb[..., 2] + rgb[..., 1] > 2 * rgb[..., 0])
    return -np.log10(np.clip(rgb, 1, 255) / 255.0), core, mpp


def pen_dicom_tiles(slides_dir: Path, max_tiles: int = 150, seed: int = 5) -> np.ndarray:
    return _grid_tiles(slides_dir / "prostate-small.dcm", pen=True, max_tiles=max_tiles, seed=seed)[0]


def prostate_tissue_tiles(slides_dir: Path, max_tiles: int = 150, seed: int = 6) -> np.ndarray:
    return _grid_tiles(slides_dir / "prostate-small.dcm", max_tiles=max_tiles, seed=seed)[0]


def pen_ink_transfer(tiles: np.ndarray, slides_dir: Path, seed: int = 7) -> np.ndarray:
    """real ink on real tissue: each tile gets the optical density of the ink pixels of one real
    tile-sized footprint of the DICOM (the ink's own spatial variation and stroke edges, resampled
    from 4.6 to 0.5 um/px like the engine resamples), added to the tile's OD: ink absorbs on top of
    the stain. Footprints are chosen with 30-95 % ink, i.e. tiles at stroke edges, as on slides"""
    from PIL import Image

    od_src, core, mpp = _pen_source(slides_dir)
    rng = np.random.default_rng(seed)
    side = max(2, round(TILE * MPP / mpp))  # the tile footprint at the DICOM's resolution
    ys, xs = np.nonzero(core)
    out = []
    for t in tiles:
        for _ in range(100):
            k = rng.integers(ys.size)
            y0 = int(np.clip(ys[k] - side // 2 + rng.integers(-side // 2, side // 2 + 1), 0, core.shape[0] - side))
            x0 = int(np.clip(xs[k] - side // 2 + rng.integers(-side // 2, side // 2 + 1), 0, core.shape[1] - side))
            m = core[y0:y0 + side, x0:x0 + side]
            if 0.3 <= m.mean() <= 0.95:
                break
        ink = od_src[y0:y0 + side, x0:x0 + side] * m[..., None]
        ink = np.stack([np.asarray(Image.fromarray(ink[..., c].astype(np.float32)).resize(
            (TILE, TILE), Image.Resampling.BILINEAR)) for c in range(3)], -1)
        od = -np.log10(np.clip(t.astype(np.float64), 1, 255) / 255.0) + ink
        out.append((255.0 * 10 ** -od).round().clip(0, 255).astype(np.uint8))
    return np.stack(out)


def non_tissue_tiles(slides_dir: Path, per_slide: int = 50, seed: int = 8) -> np.ndarray:
    parts = []
    for i, name in enumerate(("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "kidney-48-5.tif")):
        parts.append(_grid_tiles(slides_dir / name, tissue=False, max_tiles=per_slide, seed=seed + i)[0])
    return np.concatenate(parts)


def fixed_shifts(shared: Path, max_tiles: int = 150) -> dict[str, np.ndarray]:
    """the shift types that are their own real images (module docstring)"""
    slides = shared / "slides"
    return {"ihc": ihc_tiles(), "pen_dicom": pen_dicom_tiles(slides, max_tiles),
            "non_tissue": non_tissue_tiles(slides, per_slide=max(10, max_tiles // 3)), "prostate_dicom": prostate_tissue_tiles(slides, max_tiles)}


def derived_shifts(shared: Path, tiles: np.ndarray, max_tiles: int = 150, seed: int = 1) -> dict[str, np.ndarray]:
    """the shift types made from in-domain ``tiles`` (blur, real ink); use held-out tiles"""
    src = tiles[_subsample(len(tiles), max_tiles, seed)]
    return {"blur_s1": blur(src, 1.0), "blur_s2": blur(src, 2.0), "blur_s4": blur(src, 4.0),
            "pen_ink_transfer": pen_ink_transfer(src, shared / "slides")}


def shifted(shared: Path, held_out: np.ndarray, max_tiles: int = 150, seed: int = 1) -> dict[str, np.ndarray]:
    """every shift type of the module docstring; ``held_out`` are in-domain test tiles to corrupt"""
    return {**fixed_shifts(shared, max_tiles), **derived_shifts(shared, held_out, max_tiles, seed)}


# -- features -------------------------------------------------------------------------------------------
def embed(runner, tiles: np.ndarray, batch: int = 32) -> np.ndarray:
    """backbone tile embeddings ``(N, D)`` float32 (the CLS embedding the engine stores per tile)"""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(tiles), batch):
            out.append(runner(tiles[s:s + batch], tokens=False).embedding.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, runner.embed_dim), np.float32)


def features(runner, tiles: np.ndarray) -> dict[str, np.ndarray]:
    """the candidate OOD features of ``tiles``: ``embedding``, ``tile_stats`` and the shipped
    ``embedding+tile_stats/1`` recipe (built by the product's :func:`ood_features`)"""
    from cellvit_optimus.safety.ood_features import EMBEDDING_TILE_STATS, ood_features, tile_statistics

    emb = embed(runner, tiles)
    st = tile_statistics(tiles)
    return {"embedding": emb, "tile_stats": st, EMBEDDING_TILE_STATS: ood_features(EMBEDDING_TILE_STATS, emb, st)}
