"""Training of the nuclei head (UNETR on a frozen backbone) and of the attention-MIL slide head.

Sits beside the slide pipeline: ``cellvit-optimus train nuclei`` / ``train mil`` (``cli_models``) call
:func:`train_nuclei` / :func:`train_mil`. The nuclei flow is

1. **read** annotated images in one of three layouts (:func:`read_dataset`): PanNuke (``images.npy``,
   ``masks.npy``, ``types.npy``), instance-map folders (CoNSeP / MoNuSeg via ``engine.datasets``, or
   ``images/`` + ``inst/`` (+ ``types/``) maps) and GeoJSON polygons (QuPath exports, PUMA);
2. **tile** them at the nuclei MPP (:func:`make_tiles`: sources at another resolution are resampled,
   e.g. 0.25 MPP by 2x for 0.5 MPP; images smaller than a tile are padded with white);
3. **cache** the frozen backbone's token maps of every tile in a versioned HDF5 file
   (:class:`TokenCache`, keyed like ``engine.features.cache_key``: backbone, weights hash,
   preprocessing, dataset fingerprint, package version; fp16), so only the first epoch of the first
   run pays for the backbone;
4. **train** the UNETR head with the HoVer-Net / CellViT losses (AdamW) on random token-aligned
   sub-crops of the cached tiles (``crop=112`` trains a fully convolutional head 4x cheaper than whole
   tiles; its weights are the same at inference on 224 tiles), optionally ordered by the curriculum
   sampler; samples without types (MoNuSeg) get no NT loss;
5. **save** a safetensors checkpoint with the class profile, the backbone id / weights hash and the
   training record inside (``heads.checkpoint``).

Splits are by source image (``NucleiSample.group``): no two patches of one image land on both sides.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.training.datasets import NucleiSample, load_consep, load_monuseg
from cellvit_optimus.engine.errors import ConfigError

__all__ = (
    "NucleiTrainConfig",
    "NucleiTrainResult",
    "TileSet",
    "TokenCache",
    "MILTrainResult",
    "dataset_fingerprint",
    "make_tiles",
    "read_dataset",
    "read_geojson_folder",
    "read_instance_folder",
    "read_pannuke",
    "rasterise_rings",
    "resample_sample",
    "split_by_group",
    "train_mil",
    "train_nuclei",
)

logger = logging.getLogger(__name__)

#: bump when the token cache layout or the tiling changes meaning: old caches then miss
TOKEN_CACHE_SCHEMA = 1
#: relative MPP difference below which a source is used at its own resolution (MoNuSeg's 0.2527 vs 0.25)
MPP_TOLERANCE = 0.05
#: padding colour of images smaller than a tile (glass is white; no nuclei there)
PAD_VALUE = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# PUMA's nucleus names (files) -> the puma_nuclei profile's class names
PUMA_NAME_MAP = {
    "nuclei_tumor": "tumour",
    "nuclei_lymphocyte": "lymphocyte",
    "nuclei_plasma_cell": "plasma cell",
    "nuclei_histiocyte": "histiocyte",
    "nuclei_melanophage": "melanophage",
    "nuclei_neutrophil": "neutrophil",
    "nuclei_stroma": "stromal",
    "nuclei_epithelium": "epithelium",
    "nuclei_endothelium": "endothelium",
    "nuclei_apoptosis": "apoptotic",
}


# ================================================================================ dataset readers
def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
    except Exception as exc:  # big or odd TIFFs Pillow cannot open
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise ConfigError(f"{path}: cannot read image ({exc})") from exc
        import tifffile

        a = np.asarray(tifffile.imread(path))
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] < 3:
            raise ConfigError(f"{path}: TIFF of shape {a.shape} is not an RGB image") from exc
        if a.dtype != np.uint8:
            a = np.clip(a.astype(np.float64) / max(float(a.max()), 1.0) * 255.0, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(a[..., :3])


def _relabel(inst: np.ndarray) -> np.ndarray:
    ids = np.unique(inst)
    ids = ids[ids > 0]
    lut = np.zeros(int(inst.max()) + 1 if inst.size else 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[inst]


def read_pannuke(folder: str | os.PathLike[str], mpp: float = 0.25) -> list[NucleiSample]:
    """PanNuke-format arrays: ``images.npy`` (N, H, W, 3), ``masks.npy`` (N, H, W, 6), optional ``types.npy``.

    ``masks[..., c]`` for c = 0..4 holds the instance ids of class ``c + 1`` (neoplastic, inflammatory,
    connective, dead, epithelial: the ``pannuke`` profile), channel 5 is background. Every
    ``images.npy`` under ``folder`` is read (PanNuke ships one per fold). Each patch is its own group
    (PanNuke's patches carry no source-image id; split PanNuke by fold instead).
    """
    root = Path(folder)
    found = sorted(root.rglob("images.npy"))
    if not found:
        raise ConfigError(f"{root}: no images.npy (PanNuke format) found")
    out: list[NucleiSample] = []
    for img_path in found:
        mask_path = img_path.with_name("masks.npy")
        if not mask_path.is_file():
            raise ConfigError(f"{img_path}: no masks.npy beside it")
        images = np.load(img_path, mmap_mode="r")
        masks = np.load(mask_path, mmap_mode="r")
        if images.ndim != 4 or masks.ndim != 4 or masks.shape[:3] != images.shape[:3] or masks.shape[3] < 5:
            raise ConfigError(f"{img_path}: images {images.shape} / masks {masks.shape} are not PanNuke arrays")
        rel = img_path.parent.relative_to(root).as_posix()
        for i in range(images.shape[0]):
            m = np.asarray(masks[i])
            inst = np.zeros(m.shape[:2], np.int64)
            tmap = np.zeros(m.shape[:2], np.int32)
            offset = 0
            for c in range(5):
                ch = m[..., c].astype(np.int64)
                sel = ch > 0
                inst[sel] = ch[sel] + offset
                tmap[sel] = c + 1
                offset += int(ch.max()) + 1
            img = np.asarray(images[i])
            img = np.clip(img, 0, 255).astype(np.uint8) if img.dtype != np.uint8 else img
            name = f"pannuke/{rel}/{i:05d}"
            out.append(NucleiSample(name, "pannuke", np.ascontiguousarray(img), _relabel(inst), tmap, mpp, name))
    return out


def read_instance_folder(folder: str | os.PathLike[str], mpp: float = 0.25) -> list[NucleiSample]:
    """A folder of images with instance (and optional type) maps, CoNSeP / MoNuSeg style.

    Layout: ``images/<stem>.(png|jpg|tif)`` with ``inst/<stem>.npy`` (H, W) instance ids, or
    ``labels/<stem>.(npy|mat)`` (``.mat`` with ``inst_map`` and optionally ``type_map``, as HoVer-Net's
    CoNSeP release); optional ``types/<stem>.npy`` per-pixel class ids (0 background). A stem
    ``<image>_<patch>`` groups by ``<image>`` when several stems share it, else each image is a group.
    """
    root = Path(folder)
    img_dir = root / "images"
    if not img_dir.is_dir():
        raise ConfigError(f"{root}: expected an images/ folder (with inst/ or labels/ beside it)")
    out: list[NucleiSample] = []
    for img_path in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        stem = img_path.stem
        inst = tmap = None
        for cand in (root / "inst" / f"{stem}.npy", root / "labels" / f"{stem}.npy"):
            if cand.is_file():
                inst = np.load(cand)
                break
        mat = root / "labels" / f"{stem}.mat"
        if inst is None and mat.is_file():
            import scipy.io as sio

            d = sio.loadmat(str(mat))
            if "inst_map" not in d:
                raise ConfigError(f"{mat}: no 'inst_map' variable (found {sorted(k for k in d if k[0] != '_')})")
            inst = d["inst_map"]
            tmap = d.get("type_map")
        if inst is None:
            raise ConfigError(f"{img_path}: no instance map (looked for inst/{stem}.npy, labels/{stem}.npy|.mat)")
        tpath = root / "types" / f"{stem}.npy"
        if tpath.is_file():
            tmap = np.load(tpath)
        image = _read_image(img_path)
        inst = np.asarray(inst)
        if inst.shape != image.shape[:2]:
            raise ConfigError(f"{img_path}: image {image.shape[:2]} vs instance map {inst.shape}")
        if tmap is not None and np.asarray(tmap).shape != inst.shape:
            raise ConfigError(f"{img_path}: type map {np.asarray(tmap).shape} vs instance map {inst.shape}")
        out.append(
            NucleiSample(
                name=f"{root.name}/{stem}",
                source=root.name,
                image=image,
                inst_map=_relabel(inst.astype(np.int64)),
                type_map=None if tmap is None else np.asarray(tmap).astype(np.int32),
                mpp=mpp,
                group=stem,
            )
        )
    if not out:
        raise ConfigError(f"{img_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    stems = [s.group for s in out]
    prefixes = [g.rsplit("_", 1)[0] for g in stems]
    if len(set(prefixes)) < len(prefixes):  # <image>_<patch> naming: group patches by their image
        out = [NucleiSample(s.name, s.source, s.image, s.inst_map, s.type_map, s.mpp, f"{root.name}/{p}")
               for s, p in zip(out, prefixes)]
    else:
        out = [NucleiSample(s.name, s.source, s.image, s.inst_map, s.type_map, s.mpp, f"{root.name}/{s.group}")
               for s in out]
    return out


def _geojson_polygons(path: Path) -> list[tuple[np.ndarray, str | None]]:
    """(K, 2) exterior rings and class names from a GeoJSON FeatureCollection or PUMA polygon JSON."""
    data = json.loads(path.read_text(encoding="utf-8"))
    out: list[tuple[np.ndarray, str | None]] = []
    if isinstance(data, dict) and "polygons" in data:  # grand-challenge "multiple polygons" (PUMA)
        for p in data["polygons"]:
            pts = np.asarray([q[:2] for q in p.get("path_points", [])], np.float64)
            if len(pts) >= 3:
                out.append((pts, p.get("name")))
        return out
    feats = data.get("features", []) if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    for f in feats:
        geom = f.get("geometry") or {}
        props = f.get("properties") or {}
        cls = props.get("classification")
        name = cls.get("name") if isinstance(cls, dict) else (cls if isinstance(cls, str) else None)
        gtype = geom.get("type")
        polys = [geom.get("coordinates", [])] if gtype == "Polygon" else (
            geom.get("coordinates", []) if gtype == "MultiPolygon" else [])
        for poly in polys:
            if poly and len(poly[0]) >= 3:
                out.append((np.asarray(poly[0], np.float64)[:, :2], name))
    return out


def read_geojson_folder(
    folder: str | os.PathLike[str], profile: Any | None = None, mpp: float = 0.25
) -> list[NucleiSample]:
    """Images with nuclei as GeoJSON polygons (QuPath export, PUMA), rasterised one instance each.

    Layout: ``images/<stem>.*`` with ``<stem>.geojson`` or ``<stem>.json`` in ``annotations/`` (or
    beside the images). Class names are matched to ``profile`` (a :class:`ClassProfile`; PUMA's
    ``nuclei_*`` names are mapped to the ``puma_nuclei`` profile's); without a profile, or for names it
    lacks, the nucleus is kept untyped (type 0 on an image with types is not allowed, so such images
    get no type map at all).
    """
    root = Path(folder)
    img_dir = root / "images" if (root / "images").is_dir() else root
    out: list[NucleiSample] = []
    for img_path in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        ann = None
        for d in (root / "annotations", img_dir, root):
            for ext in (".geojson", ".json"):
                if (d / f"{img_path.stem}{ext}").is_file():
                    ann = d / f"{img_path.stem}{ext}"
                    break
            if ann:
                break
        if ann is None:
            raise ConfigError(f"{img_path}: no {img_path.stem}.geojson/.json annotation")
        image = _read_image(img_path)
        polys = _geojson_polygons(ann)
        inst = _relabel(rasterise_rings([p for p, _ in polys], range(1, len(polys) + 1), image.shape[:2]))
        tmap = None
        if profile is not None and polys:
            ids = []
            for _, name in polys:
                name = PUMA_NAME_MAP.get(name, name) if name else None
                try:
                    ids.append(profile.index(name) if name else -1)
                except KeyError:
                    ids.append(-1)
            if min(ids) > 0:
                # rasterise again with class ids to get each instance's class (later polygons win, as inst)
                cls_map = rasterise_rings([p for p, _ in polys], ids, image.shape[:2])
                tmap = np.where(inst > 0, cls_map, 0).astype(np.int32)
        out.append(NucleiSample(f"{root.name}/{img_path.stem}", root.name, image, inst, tmap, mpp,
                                f"{root.name}/{img_path.stem}"))
    if not out:
        raise ConfigError(f"{img_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return out


def rasterise_rings(polys: Sequence[np.ndarray], values: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Paint ring ``k`` ((K, 2) x, y in GeoJSON's pixel-corner convention: pixel (x, y) covers
    [x, x+1] x [y, y+1]) with ``values[k]``: a pixel is inside when its centre is; later rings win.

    Returns an (H, W) int32 map. Exact for the contours ``kernels.instance_table`` writes, unlike
    Pillow's polygon drawing, whose outline covers pixels on both sides of an edge.
    """
    import shapely
    from shapely.geometry import Polygon

    h, w = shape
    out = np.zeros((h, w), np.int32)
    for ring, v in zip(polys, values):
        ring = np.asarray(ring, np.float64)
        if ring.shape[0] < 3:
            continue
        poly = Polygon(ring)
        if not poly.is_valid:
            poly = poly.buffer(0)
        x0, y0, x1, y1 = poly.bounds
        xa, xb = max(0, int(np.floor(x0 - 0.5))), min(w, int(np.ceil(x1 + 0.5)))
        ya, yb = max(0, int(np.floor(y0 - 0.5))), min(h, int(np.ceil(y1 + 0.5)))
        if xa >= xb or ya >= yb:
            continue
        yy, xx = np.mgrid[ya:yb, xa:xb]
        inside = shapely.contains_xy(poly, xx + 0.5, yy + 0.5)
        out[ya:yb, xa:xb][inside] = int(v)
    return out


def read_dataset(spec: str, *, profile: Any | None = None, root: str | os.PathLike[str] | None = None,
                 mpp: float | None = None) -> list[NucleiSample]:
    """Read a dataset named on the command line.

    ``spec`` is ``consep`` / ``monuseg`` (the shared real sets, ``root`` = the ``nuclei`` folder), or
    ``[pannuke:|folder:|geojson:]PATH`` (without a prefix the layout is detected: ``images.npy`` ->
    PanNuke, ``inst/`` or ``labels/`` -> instance folder, else GeoJSON). ``mpp`` overrides the source
    resolution of path datasets (default 0.25, 40x).
    """
    r = Path(root) if root is not None else None
    if spec == "consep":
        return load_consep(r)
    if spec == "monuseg":
        return load_monuseg(r)
    kind, _, path = spec.partition(":") if spec.split(":", 1)[0] in ("pannuke", "folder", "geojson") else (
        "", "", spec)
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"dataset {spec!r}: {p} does not exist (or use 'consep' / 'monuseg')")
    m = 0.25 if mpp is None else float(mpp)
    if not kind:
        if any(p.rglob("images.npy")):
            kind = "pannuke"
        elif (p / "inst").is_dir() or (p / "labels").is_dir():
            kind = "folder"
        else:
            kind = "geojson"
    if kind == "pannuke":
        return read_pannuke(p, m)
    if kind == "folder":
        return read_instance_folder(p, m)
    return read_geojson_folder(p, profile, m)


def split_by_group(samples: Sequence[NucleiSample], held_out: Sequence[str]) -> tuple[list[NucleiSample], list[NucleiSample]]:
    """Split by source image: a sample is held out when its ``group`` or ``name`` is in ``held_out``
    (``consep/test_3``, ``monuseg/TCGA-...``), so patches of one image never land on both sides."""
    keys = set(held_out)
    test = [s for s in samples if s.group in keys or s.name in keys]
    unknown = keys - {s.group for s in samples} - {s.name for s in samples}
    if unknown:
        raise ConfigError(f"held-out groups not found in the data: {sorted(unknown)}")
    train = [s for s in samples if not (s.group in keys or s.name in keys)]
    assert not ({s.group for s in train} & {s.group for s in test})
    return train, test


# ================================================================================ tiling
def resample_sample(s: NucleiSample, target_mpp: float) -> NucleiSample:
    """``s`` at ``target_mpp`` (area-averaged image, nearest-neighbour labels); unchanged within 5 %."""
    scale = s.mpp / target_mpp
    if abs(scale - 1.0) <= MPP_TOLERANCE:
        return s
    from PIL import Image

    h, w = s.inst_map.shape
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = np.asarray(Image.fromarray(s.image).resize((nw, nh), Image.Resampling.BOX if scale < 1 else
                                                     Image.Resampling.BILINEAR))
    inst = np.asarray(Image.fromarray(s.inst_map.astype(np.int32)).resize((nw, nh), Image.Resampling.NEAREST))
    tmap = None if s.type_map is None else np.asarray(
        Image.fromarray(s.type_map.astype(np.int32)).resize((nw, nh), Image.Resampling.NEAREST))
    return NucleiSample(s.name, s.source, np.ascontiguousarray(img), _relabel(inst.astype(np.int64)),
                        None if tmap is None else tmap.astype(np.int32), target_mpp, s.group)


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts covering ``[0, length)`` with the given stride, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


@dataclass
class TileSet:
    """Fixed training tiles at the nuclei MPP (what the token cache is computed on)."""

    images: np.ndarray  # (N, S, S, 3) uint8
    inst: np.ndarray  # (N, S, S) int32, per-tile ids 1..k
    types: np.ndarray  # (N, S, S) uint8 (0 where untyped)
    has_types: np.ndarray  # (N,) bool
    names: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def make_tiles(samples: Sequence[NucleiSample], nuclei_mpp: float, tile: int = 224,
               stride: int = 168) -> TileSet:
    """Cut every sample, resampled to ``nuclei_mpp``, into ``tile``-pixel tiles (white-padded if smaller)."""
    imgs, insts, types, has, names = [], [], [], [], []
    for s in samples:
        r = resample_sample(s, nuclei_mpp)
        h, w = r.inst_map.shape
        ph, pw = max(h, tile), max(w, tile)
        img = np.full((ph, pw, 3), PAD_VALUE, np.uint8)
        img[:h, :w] = r.image
        inst = np.zeros((ph, pw), np.int32)
        inst[:h, :w] = r.inst_map
        tm = np.zeros((ph, pw), np.uint8)
        if r.type_map is not None:
            tm[:h, :w] = r.type_map
        for y in tile_origins(ph, tile, stride):
            for x in tile_origins(pw, tile, stride):
                imgs.append(img[y:y + tile, x:x + tile])
                insts.append(_relabel(inst[y:y + tile, x:x + tile].astype(np.int64)))
                types.append(tm[y:y + tile, x:x + tile])
                has.append(r.type_map is not None)
                names.append(f"{s.name}@{x},{y}")
    if not imgs:
        raise ConfigError("no training tiles: the dataset is empty")
    return TileSet(np.stack(imgs), np.stack(insts).astype(np.int32), np.stack(types), np.asarray(has, bool), names)


def dataset_fingerprint(tiles: TileSet) -> str:
    """SHA-256 over the tiles' pixels, labels and names: what the token cache is valid for."""
    h = hashlib.sha256()
    h.update(json.dumps(tiles.names).encode())
    for a in (tiles.images, tiles.inst, tiles.types, tiles.has_types):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


# ================================================================================ token cache
class TokenCache:
    """The backbone's token maps of a :class:`TileSet`, in one versioned HDF5 file (fp16).

    The file is ``<cache_dir>/tokens-<key>.h5``; ``key`` is ``engine.features.cache_key`` of the
    backbone preset, weights hash, preprocessing (normalisation, blocks, tile size, nuclei MPP), the
    dataset fingerprint and the package version. :meth:`load` computes whatever is missing (written to
    a temporary name and renamed when complete) and returns the maps; a second call, or a second run
    on the same data, reads the file and makes no backbone call.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], runner: Any, tiles: TileSet, nuclei_mpp: float) -> None:
        from cellvit_optimus.engine import __version__
        from cellvit_optimus.engine.pipeline.features import cache_key

        self.runner = runner
        self.tiles = tiles
        pre = runner.preset
        self.preprocessing = {
            "schema": TOKEN_CACHE_SCHEMA,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "tile_size": pre.tile_size,
            "blocks": list(runner.blocks),
            "nuclei_mpp": float(nuclei_mpp),
            "dtype": "float16",
            "compute_dtype": runner.dtype,
        }
        self.key = cache_key(backbone=pre.name, weights_hash=runner.weights_id, preprocessing=self.preprocessing,
                             slide=dataset_fingerprint(tiles), version=__version__)
        self.path = Path(cache_dir) / f"tokens-{self.key}.h5"
        self.backbone_calls = 0

    def exists(self) -> bool:
        import h5py

        if not self.path.is_file():
            return False
        try:
            with h5py.File(self.path, "r") as f:
                return bool(f.attrs.get("complete", False)) and f.attrs.get("cache_key") == self.key
        except OSError:
            return False

    def load(self, batch_size: int = 32) -> np.ndarray:
        """(N, n_blocks, D, g, g) float16 token maps, computed and cached if absent."""
        import h5py

        if not self.exists():
            self._build(batch_size)
        with h5py.File(self.path, "r") as f:
            return f["tokens"][()]

    def _build(self, batch_size: int) -> None:
        import h5py
        import torch

        n = len(self.tiles)
        r = self.runner
        nb, d, g = len(r.blocks), r.embed_dim, r.grid_size
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}.{os.getpid()}")
        calls0 = r.calls
        t0 = time.perf_counter()
        try:
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("tokens", shape=(n, nb, d, g, g), dtype="float16",
                                      chunks=(1, nb, d, g, g), track_times=False)
                f.create_dataset("names", data=np.asarray(self.tiles.names, dtype=object),
                                 dtype=h5py.string_dtype(), track_times=False)
                for k, v in {"backbone": r.preset.name, "weights_hash": r.weights_id,
                             "preprocessing": json.dumps(self.preprocessing, sort_keys=True),
                             "cache_key": self.key, "complete": False}.items():
                    f.attrs[k] = v
                for s in range(0, n, batch_size):
                    out = r(self.tiles.images[s:s + batch_size], tokens=True)
                    ds[s:s + out.embedding.shape[0]] = torch.stack(out.tokens, 1).to(torch.float16).cpu().numpy()
                f.attrs["complete"] = True
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.backbone_calls += r.calls - calls0
        logger.info("token cache %s: %d tiles in %.1f s", self.path.name, n, time.perf_counter() - t0)


# ================================================================================ training
@dataclass(frozen=True)
class NucleiTrainConfig:
    """Hyper-parameters of :func:`train_nuclei` (defaults: what trained the bundled model)."""

    nuclei_mpp: float = 0.5
    backbone: str = "tiny"
    backbone_weights: str | None = None
    decoder_channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    epochs: int = 8
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    #: training crop (pixels, a multiple of the patch size, <= tile): random token-aligned sub-crops
    crop: int = 112
    tile_stride: int = 168
    curriculum: bool = False
    curriculum_start: float = 0.3
    curriculum_warmup: int = 5
    seed: int = 0
    threads: int | None = None
    max_minutes: float | None = None
    cache_dir: str | None = None
    hv_min_size: int = 10

    def __post_init__(self) -> None:
        if not (self.nuclei_mpp > 0 and math.isfinite(self.nuclei_mpp)):
            raise ConfigError(f"nuclei_mpp={self.nuclei_mpp} must be a positive number")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs={self.epochs}, batch_size={self.batch_size} must be >= 1")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ConfigError(f"lr={self.lr} must be > 0 and weight_decay={self.weight_decay} >= 0")
        if self.crop < 14 or self.crop % 14 or self.crop > 224:
            raise ConfigError(f"crop={self.crop} must be a multiple of the patch size 14 in 14..224")
        if not 0 < self.tile_stride <= 224:
            raise ConfigError(f"tile_stride={self.tile_stride} must be in 1..224")
        if len(self.decoder_channels) != 4:
            raise ConfigError(f"decoder_channels={self.decoder_channels} must be 4 widths")


@dataclass
class NucleiTrainResult:
    """What :func:`train_nuclei` did: the checkpoint, per-epoch history and the held-out metrics."""

    checkpoint: Path | None
    history: list[dict[str, float]]
    metrics: dict[str, Any] | None
    cache_path: Path
    backbone_calls_cache: int
    seconds: float
    n_train_tiles: int
    record: dict[str, Any] = field(default_factory=dict)


def _profile_for(samples: Sequence[NucleiSample], profile: Any | None) -> Any:
    from cellvit_optimus.heads.profiles import CONSEP, PANNUKE

    if profile is not None:
        return profile
    sources = {s.source for s in samples if s.type_map is not None}
    if sources <= {"consep"}:
        return CONSEP
    if sources <= {"pannuke"}:
        return PANNUKE
    raise ConfigError(f"typed samples from {sorted(sources)}: pass the class profile they share")


def train_nuclei(
    train_samples: Sequence[NucleiSample],
    out: str | os.PathLike[str] | None,
    config: NucleiTrainConfig = NucleiTrainConfig(),
    *,
    profile: Any | None = None,
    val_samples: Sequence[NucleiSample] = (),
    runner: Any | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
    extra_record: dict[str, Any] | None = None,
) -> NucleiTrainResult:
    """Train a UNETR nuclei head on a frozen backbone's cached token maps and save it to ``out``.

    Parameters
    ----------
    train_samples : annotated images (any MPP; resampled to ``config.nuclei_mpp``)
    out : checkpoint path (``.safetensors``), or None to skip saving
    profile : ClassProfile of the type labels (default: CoNSeP for CoNSeP data, PanNuke for PanNuke)
    val_samples : held-out images, evaluated with :func:`cellvit_optimus.engine.pipeline.nuclei.evaluate` at the end
    runner : a BackboneRunner to use (default: built from ``config.backbone`` / ``backbone_weights``)
    progress : called with each epoch's record (the CLI prints it)
    """
    import torch

    from cellvit_optimus.heads.checkpoint import save_nuclei_head
    from cellvit_optimus.heads.curriculum import CurriculumSampler, instance_density
    from cellvit_optimus.heads.losses import LossWeights, NucleiLoss, typed_nt_loss
    from cellvit_optimus.heads.unetr import UNETRHead
    from cellvit_optimus.kernels import instances_to_hv

    from cellvit_optimus.engine.pipeline.runner import BackboneRunner

    cfg = config
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t_start = time.perf_counter()
    prof = _profile_for(train_samples, profile)
    for s in train_samples:
        if s.type_map is not None and int(s.type_map.max()) > prof.num_classes:
            raise ConfigError(f"{s.name}: type id {int(s.type_map.max())} outside profile {prof.name!r} "
                              f"({prof.num_classes} classes)")
    if runner is None:
        runner = BackboneRunner(cfg.backbone, weights=cfg.backbone_weights, device="cpu", batch_size=16)
    tiles = make_tiles(train_samples, cfg.nuclei_mpp, runner.preset.tile_size, cfg.tile_stride)
    cache_dir = cfg.cache_dir or os.environ.get("OPTIMUS_CACHE_DIR") or Path.home() / ".cache" / "cellvit-optimus" / "tokens"
    cache = TokenCache(cache_dir, runner, tiles, cfg.nuclei_mpp)
    calls0 = runner.calls
    tokens = torch.from_numpy(cache.load())  # (N, 4, D, g, g) fp16
    cache_calls = runner.calls - calls0
    images = runner.preprocess(tiles.images).float()  # (N, 3, S, S), the image skip input
    n, p = len(tiles), runner.preset.patch_size
    crop, gc = cfg.crop, cfg.crop // p

    torch.manual_seed(cfg.seed)
    head = UNETRHead(runner.embed_dim, prof.num_classes, patch_size=p, tile_size=runner.preset.tile_size,
                     decoder_channels=cfg.decoder_channels)
    # the same weights, built for the training crop: the head is fully convolutional
    train_head = head if crop == runner.preset.tile_size else UNETRHead(
        runner.embed_dim, prof.num_classes, patch_size=p, tile_size=crop, decoder_channels=cfg.decoder_channels)
    if train_head is not head:
        train_head.load_state_dict(head.state_dict())
    opt = torch.optim.AdamW(train_head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.1)
    lw = LossWeights()
    np_hv_loss = NucleiLoss(LossWeights(nt_ce=0.0, nt_dice=0.0, nt_ft=0.0))
    sampler = None
    if cfg.curriculum:
        sampler = CurriculumSampler(n, instance_density(tiles.inst), start_fraction=cfg.curriculum_start,
                                    warmup_epochs=cfg.curriculum_warmup, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, float]] = []
    deadline = None if cfg.max_minutes is None else t_start + 60.0 * cfg.max_minutes
    stopped_early = False
    for epoch in range(cfg.epochs):
        t_ep = time.perf_counter()
        calls_ep = runner.calls
        train_head.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
            order = np.fromiter(iter(sampler), np.int64)
        else:
            order = rng.permutation(n)
        sums: dict[str, float] = {}
        nb = 0
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            oy = rng.integers(0, (runner.preset.grid_size - gc) + 1, size=len(idx))
            ox = rng.integers(0, (runner.preset.grid_size - gc) + 1, size=len(idx))
            tok = torch.stack([tokens[i, :, :, y:y + gc, x:x + gc] for i, y, x in zip(idx, oy, ox)]).float()
            img = torch.stack([images[i, :, y * p:y * p + crop, x * p:x * p + crop] for i, y, x in zip(idx, oy, ox)])
            np_t, hv_t, nt_t = [], [], []
            for i, y, x in zip(idx, oy, ox):
                inst = tiles.inst[i, y * p:y * p + crop, x * p:x * p + crop]
                a, hv = instances_to_hv(inst, min_size=cfg.hv_min_size)
                np_t.append(a)
                hv_t.append(hv)
                nt_t.append(tiles.types[i, y * p:y * p + crop, x * p:x * p + crop])
            np_target = torch.from_numpy(np.stack(np_t)).long()
            hv_target = torch.from_numpy(np.stack(hv_t))
            nt_target = torch.from_numpy(np.stack(nt_t).astype(np.int64))
            out_ = train_head(tuple(tok.unbind(1)), img)
            loss = np_hv_loss(out_, np_target, hv_target, nt_target)
            total = loss.total
            terms = {k: float(v) for k, v in loss.terms.items()}
            nt = typed_nt_loss(out_.nt_logits, nt_target, torch.from_numpy(tiles.has_types[idx]), lw)
            if nt is not None:
                total = total + nt[0]
                terms.update(nt[1])
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if sched.last_epoch < sched.total_steps - 1:
                sched.step()
            terms["loss"] = float(total.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            nb += 1
            if sampler is not None:
                sampler.update(idx, np.full(len(idx), terms["loss"]))
        rec = {k: v / max(nb, 1) for k, v in sums.items()}
        rec.update(epoch=epoch + 1, seconds=time.perf_counter() - t_ep, backbone_calls=runner.calls - calls_ep,
                   tiles=len(order))
        history.append(rec)
        logger.info("epoch %d: %s", epoch + 1, rec)
        if progress is not None:
            progress(rec)
        if deadline is not None and time.perf_counter() > deadline and epoch + 1 < cfg.epochs:
            stopped_early = True
            break
    if train_head is not head:
        head.load_state_dict(train_head.state_dict())
    head.eval()
    seconds = time.perf_counter() - t_start
    record: dict[str, Any] = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "cache_dir"},
        "train_images": sorted({s.name for s in train_samples}),
        "train_groups": sorted({s.group for s in train_samples}),
        "held_out_groups": sorted({s.group for s in val_samples}),
        "n_train_tiles": n,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "train_seconds": round(seconds, 1),
        "final_loss": history[-1].get("loss") if history else None,
        "head_trained_crop": crop,
        **(extra_record or {}),
    }
    metrics = None
    if val_samples:
        from cellvit_optimus.engine.pipeline.nuclei import NucleiModel, evaluate

        model = NucleiModel.from_parts(head, prof, runner, cfg.nuclei_mpp)
        metrics = evaluate(model, val_samples)
        record["held_out_metrics"] = metrics
    ckpt = None
    if out is not None:
        ckpt = Path(out)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        from cellvit_optimus.engine.io import atomic_path

        with atomic_path(ckpt) as tmp:
            save_nuclei_head(tmp, head, profile=prof, backbone_id=runner.preset.name,
                             backbone_hash=runner.weights_id, nuclei_mpp=cfg.nuclei_mpp, extra=record)
    return NucleiTrainResult(ckpt, history, metrics, cache.path, cache_calls, seconds, n, record)


# ================================================================================ MIL
@dataclass
class MILTrainResult:
    checkpoint: Path | None
    classes: tuple[str, ...]
    n_bags: int
    train_accuracy: float


def _read_labels(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"slide", "label"} <= set(rows[0]):
        raise ConfigError(f"{path}: need a CSV with columns 'slide' and 'label' (got {list(rows[0]) if rows else []})")
    return {Path(r["slide"]).stem if r["slide"].endswith((".h5", ".svs", ".tif", ".tiff")) else r["slide"]:
            r["label"].strip() for r in rows}


def train_mil(
    bags_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    epochs: int = 40,
    lr: float = 2e-4,
    hidden_dim: int = 256,
    attn_dim: int = 128,
    dropout: float = 0.25,
    seed: int = 0,
) -> MILTrainResult:
    """Train a gated attention-MIL head on the HDF5 feature files of ``cellvit-optimus extract``.

    ``labels_csv`` has columns ``slide,label`` (slide = the feature file's stem or the slide's file
    name). Two classes give one logit (sigmoid; the second sorted label, or "1", is positive), more give
    one logit per class. The checkpoint records the classes and the backbone id / weights hash read from
    the feature files, which must all agree.
    """
    from cellvit_optimus.heads.checkpoint import save_mil
    from cellvit_optimus.heads.mil import fit_mil, predict_mil

    from cellvit_optimus.engine.pipeline.features import read_features

    labels = _read_labels(Path(labels_csv))
    files = sorted(Path(bags_dir).glob("*.h5"))
    if not files:
        raise ConfigError(f"{bags_dir}: no .h5 feature files")
    bags, ys, ids = [], [], set()
    for f in files:
        if f.stem not in labels:
            logger.warning("%s: no label in %s, skipped", f.name, labels_csv)
            continue
        ff = read_features(f)
        if ff.features.shape[0] == 0:
            logger.warning("%s: empty bag, skipped", f.name)
            continue
        ids.add((str(ff.attrs.get("backbone", "unknown")), str(ff.attrs.get("weights_hash", "unknown"))))
        bags.append(np.asarray(ff.features, np.float32))
        ys.append(labels[f.stem])
    if len(bags) < 2:
        raise ConfigError(f"{bags_dir}: {len(bags)} labelled bags; need at least 2")
    if len(ids) > 1:
        raise ConfigError(f"{bags_dir}: feature files come from different backbones/weights: {sorted(ids)}")
    classes = tuple(sorted(set(ys), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v)))
    if len(classes) < 2:
        raise ConfigError(f"{labels_csv}: only one label {classes}; need two or more classes")
    y = np.asarray([classes.index(v) for v in ys])
    n_out = 1 if len(classes) == 2 else len(classes)
    model = fit_mil(bags, y, n_outputs=n_out, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout,
                    epochs=epochs, lr=lr, seed=seed)
    logits = predict_mil(model, bags).logits
    pred = (logits[:, 0] > 0).astype(int) if n_out == 1 else logits.argmax(1)
    acc = float((pred == y).mean())
    ckpt = None
    if out is not None:
        backbone, whash = next(iter(ids))
        ckpt = Path(out)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        names = (classes[1],) if n_out == 1 else classes
        save_mil(ckpt, model, backbone_id=backbone, backbone_hash=whash, output_names=names,
                 extra={"classes": list(classes), "n_bags": len(bags), "epochs": epochs, "lr": lr,
                        "train_accuracy": acc, "bags_dir": str(bags_dir)})
    return MILTrainResult(ckpt, classes, len(bags), acc)
