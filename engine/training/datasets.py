"""Readers of annotated nuclei images: the real sets in ``shared/data/nuclei`` (CoNSeP patches, MoNuSeg
train) and the layouts ``cellvit-optimus train nuclei`` accepts (:func:`read_dataset`: PanNuke arrays,
instance-map folders, GeoJSON polygons), with the split by source image and the resampling to the
nuclei MPP.

Used by the kernel tests (round trips, metrics), the head training loops and the benchmarks. Plain
numpy / Pillow / scipy.io / shapely only (no torch), so they can be imported anywhere.

Data facts checked against the files (see also ``shared/data/README.md``):

* **CoNSeP patches** (80 of 256x256, from the 14 CoNSeP test images, of which 5 here): the names are
  ``test_<image>_<patch>``, so ``test_3_007`` is patch 7 of CoNSeP test image 3 and ``group`` is
  ``"consep/test_3"``. ``inst/*.npy`` keeps the *original* image's instance ids (not contiguous); the
  loader relabels them to 1..N in increasing order of the original id. ``type_mat/*.mat`` holds
  ``inst_type`` (N, 1) and ``inst_centroid`` (N, 2, (x, y)) in that same sorted-id order (the centroids
  match the instance maps to 1e-13 px). The types are the HoVer-Net *merged* CoNSeP scheme, values 1-4
  (all four occur): 1 other, 2 inflammatory, 3 epithelial (healthy + malignant), 4 spindle-shaped
  (fibroblast + muscle + endothelial). ``seg_mask/*.png`` agrees with ``inst_type`` on every one of the
  3,383 nuclei (majority value of the mask inside each instance) and its foreground equals the
  instance foreground exactly, so ``type_map`` is built from ``inst_type`` (and equals ``seg_mask``).
* **MoNuSeg train** (13 images of 1000x1000): Aperio XML, one ``Region`` polygon per nucleus with
  vertices in (x, y) pixel coordinates. Each region is rasterised as its own instance in file order
  (Pillow ``ImageDraw.polygon``, outline included); where polygons overlap the later one wins, and
  regions that end up with no pixel are dropped before relabelling to 1..N. No types (``type_map`` is
  None). ``mpp`` is read from the XML (``MicronsPerPixel``, 0.2527 for these files).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.pipeline import MPP_TOLERANCE

__all__ = (
    "CONSEP_CLASSES",
    "CONSEP_FOLDERS",
    "IMAGE_SUFFIXES",
    "NucleiSample",
    "PUMA_NAME_MAP",
    "default_nuclei_root",
    "load_consep",
    "load_monuseg",
    "rasterise_polygons",
    "rasterise_rings",
    "read_dataset",
    "read_geojson_folder",
    "read_image",
    "read_instance_folder",
    "read_pannuke",
    "relabel",
    "relabel_ids",
    "resample_sample",
    "split_by_group",
)

#: class names of the merged CoNSeP scheme (HoVer-Net), index = type id (0 = background)
CONSEP_CLASSES: tuple[str, ...] = ("background", "other", "inflammatory", "epithelial", "spindle-shaped")

#: nominal resolution of CoNSeP (40x); MoNuSeg reads its own from the XML
CONSEP_MPP: float = 0.25

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


@dataclass(frozen=True)
class NucleiSample:
    """One annotated image.

    Attributes
    ----------
    name : str
        ``"consep/test_1_003"`` or ``"monuseg/TCGA-18-5592-01Z-00-DX1"``.
    source : str
        ``"consep"`` or ``"monuseg"``.
    image : ndarray, (H, W, 3) uint8
        RGB pixels.
    inst_map : ndarray, (H, W) int32
        0 background, 1..N instances (contiguous).
    type_map : ndarray, (H, W) int32 or None
        Per-pixel nucleus class (0 background, ids of :data:`CONSEP_CLASSES`); None without types.
    mpp : float
        Microns per pixel.
    group : str
        Source image id; patches of one image share it, so splits by group do not leak.
    """

    name: str
    source: str
    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray | None
    mpp: float
    group: str


def default_nuclei_root() -> Path:
    """``$OPTIMUS_SHARED_DATA/nuclei`` if set, else ``shared/data/nuclei`` beside the repository."""
    env = os.environ.get("OPTIMUS_SHARED_DATA")
    if env:
        return Path(env) / "nuclei"
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nuclei"


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"nuclei data folder not found: {path}")
    return path


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def relabel_ids(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous 1..N relabelling; returns the new map and the sorted old ids (index k -> new id k+1)."""
    ids = np.unique(inst)
    ids = ids[ids > 0]
    lut = np.zeros(int(inst.max()) + 1 if inst.size else 1, dtype=np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[inst].astype(np.int32, copy=False), ids


def relabel(inst: np.ndarray) -> np.ndarray:
    """(H, W) int32 map with the instances of ``inst`` renumbered 1..N in increasing order of their id."""
    return relabel_ids(inst)[0]


#: CoNSeP folders under the ``nuclei`` root, by split
CONSEP_FOLDERS = {"train": "consep-train", "test": "consep-patches"}
#: side of a whole CoNSeP image and of its patches; patch ``k`` of an image sits at :data:`CONSEP_PATCH_ORIGINS`
CONSEP_IMAGE_SIZE, CONSEP_PATCH_SIZE = 1000, 256
#: (row, col) of patch k = 0..15: a 3x3 grid at {0, 256, 512}, then row 744 at cols 0/256/512, col 744 at
#: rows 0/256/512, and (744, 744); together they cover the image (shared/data/README.md)
CONSEP_PATCH_ORIGINS: tuple[tuple[int, int], ...] = (
    tuple((r, c) for r in (0, 256, 512) for c in (0, 256, 512))
    + tuple((744, c) for c in (0, 256, 512)) + tuple((r, 744) for r in (0, 256, 512)) + ((744, 744),)
)


def _consep_patch(base: Path, stem: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, original instance ids, per-pixel type) of one CoNSeP patch; ids as in the source image."""
    import scipy.io as sio

    npy = base / "inst" / f"{stem}.npy"
    img_path = base / "images" / f"{stem}.jpg"
    mat_path = base / "type_mat" / f"{stem}.mat"
    for p in (npy, img_path, mat_path):
        if not p.is_file():
            raise FileNotFoundError(f"CoNSeP patch {stem}: missing {p}")
    raw = np.load(npy).astype(np.int32, copy=False)
    _, old_ids = relabel_ids(raw)
    types = np.asarray(sio.loadmat(str(mat_path))["inst_type"]).reshape(-1).astype(np.int32)
    if types.size != old_ids.size:
        raise ValueError(f"{mat_path}: inst_type has {types.size} entries but {npy} has {old_ids.size} instances")
    lut = np.zeros(int(raw.max()) + 1, dtype=np.int32)
    lut[old_ids] = types
    image = _read_rgb(img_path)
    if image.shape[:2] != raw.shape:
        raise ValueError(f"{img_path}: image shape {image.shape[:2]} != instance map shape {raw.shape}")
    return image, raw, lut[raw]


def load_consep(root: Path | None = None, split: str = "test", whole: bool = False) -> list[NucleiSample]:
    """Load CoNSeP images (sorted by name).

    Parameters
    ----------
    root : Path, optional
        The ``nuclei`` folder (holding ``consep-patches/`` and ``consep-train/``); default
        :func:`default_nuclei_root`.
    split : {"test", "train"}
        ``"test"``: the 5 official test images of ``consep-patches/`` (``test_1`` .. ``test_5``);
        ``"train"``: the 27 official training images of ``consep-train/``.
    whole : bool
        False: one sample per 256-pixel patch (``consep/test_3_007``). True: each image stitched back to
        1000x1000 from its 16 patches (``consep/test_3``; name == group), as HoVer-Net and its peers score
        CoNSeP. Instance ids agree across overlapping patches, so an image's nuclei are whole.

    Returns
    -------
    list of NucleiSample
        ``type_map`` uses the merged scheme of :data:`CONSEP_CLASSES`.

    Raises
    ------
    FileNotFoundError
        The folder or one of a patch's files is missing (the message names the path).
    """
    if split not in CONSEP_FOLDERS:
        raise ConfigError(f"split={split!r}: expected one of {sorted(CONSEP_FOLDERS)}")
    base = _require_dir(Path(root) if root is not None else default_nuclei_root()) / CONSEP_FOLDERS[split]
    _require_dir(base)
    inst_dir = _require_dir(base / "inst")
    stems = sorted(p.stem for p in inst_dir.glob("*.npy"))
    if not stems:
        raise FileNotFoundError(f"no CoNSeP patches (*.npy) in {inst_dir}")
    by_image: dict[str, list[str]] = {}
    for stem in stems:  # <split>_<image>_<patch> -> <split>_<image>
        by_image.setdefault("_".join(stem.split("_")[:2]), []).append(stem)
    out: list[NucleiSample] = []
    if not whole:
        for stem in stems:
            image, raw, type_map = _consep_patch(base, stem)
            out.append(NucleiSample(name=f"consep/{stem}", source="consep", image=image, inst_map=relabel(raw),
                                    type_map=type_map, mpp=CONSEP_MPP, group="consep/" + "_".join(stem.split("_")[:2])))
        return out
    for image_id in sorted(by_image, key=lambda k: (len(k), k)):  # train_2 before train_10
        group = f"consep/{image_id}"
        n, s = CONSEP_IMAGE_SIZE, CONSEP_PATCH_SIZE
        img = np.zeros((n, n, 3), np.uint8)
        raw_full = np.zeros((n, n), np.int32)
        typ = np.zeros((n, n), np.int32)
        covered = np.zeros((n, n), bool)
        for stem in by_image[image_id]:
            k = int(stem.rsplit("_", 1)[1])
            if not 0 <= k < len(CONSEP_PATCH_ORIGINS):
                raise ValueError(f"CoNSeP patch {stem}: index {k} outside 0..{len(CONSEP_PATCH_ORIGINS) - 1}")
            r, c = CONSEP_PATCH_ORIGINS[k]
            image, raw, type_map = _consep_patch(base, stem)
            img[r:r + s, c:c + s] = image
            raw_full[r:r + s, c:c + s] = raw
            typ[r:r + s, c:c + s] = type_map
            covered[r:r + s, c:c + s] = True
        if not covered.all():
            raise FileNotFoundError(f"{group}: its patches in {base} do not cover the {n}x{n} image "
                                    f"({int((~covered).sum())} pixels missing)")
        out.append(NucleiSample(name=group, source="consep", image=img, inst_map=relabel(raw_full),
                                type_map=typ, mpp=CONSEP_MPP, group=group))
    return out


def _monuseg_polygons(xml_path: Path) -> tuple[list[np.ndarray], float]:
    tree = ET.parse(xml_path)
    rootel = tree.getroot()
    mpp = float(rootel.attrib.get("MicronsPerPixel", "0.25") or 0.25)
    polys: list[np.ndarray] = []
    for region in rootel.iter("Region"):
        verts = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
        if len(verts) >= 3:
            polys.append(np.asarray(verts, dtype=np.float64))
    return polys, mpp


def rasterise_polygons(polys: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Draw each (K, 2) (x, y) polygon as its own instance; later polygons overwrite earlier ones.

    Returns an (H, W) int32 map relabelled to 1..N (polygons left with no pixel are dropped).
    """
    from PIL import Image, ImageDraw

    h, w = shape
    canvas = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for k, p in enumerate(polys, start=1):
        draw.polygon([(float(x), float(y)) for x, y in p], fill=k, outline=k)
    inst = np.asarray(canvas, dtype=np.int32)
    return relabel(inst)


def load_monuseg(root: Path | None = None, exclude: Sequence[str] = ()) -> list[NucleiSample]:
    """Load the MoNuSeg training images with their XML polygons rasterised (sorted by name).

    Parameters
    ----------
    root : Path, optional
        The ``nuclei`` folder (holding ``monuseg-train/``); default :func:`default_nuclei_root`.
    exclude : sequence of str
        Groups (``monuseg/<image id>``) not to read at all, e.g. held-out images in a fitting script.

    Returns
    -------
    list of NucleiSample
        ``type_map`` is None; ``group`` is the TCGA image id (one sample per group).

    Raises
    ------
    FileNotFoundError
        The folder or an image's annotation file is missing (the message names the path).
    """
    base = _require_dir(Path(root) if root is not None else default_nuclei_root()) / "monuseg-train"
    _require_dir(base)
    img_dir = _require_dir(base / "images")
    ann_dir = _require_dir(base / "annotations")
    out: list[NucleiSample] = []
    skip = set(exclude)
    for png in sorted(img_dir.glob("*.png")):
        if f"monuseg/{png.stem}" in skip:
            continue
        xml_path = ann_dir / f"{png.stem}.xml"
        if not xml_path.is_file():
            raise FileNotFoundError(f"MoNuSeg image {png.name}: missing annotation {xml_path}")
        image = _read_rgb(png)
        polys, mpp = _monuseg_polygons(xml_path)
        inst = rasterise_polygons(polys, image.shape[:2])
        out.append(
            NucleiSample(
                name=f"monuseg/{png.stem}",
                source="monuseg",
                image=image,
                inst_map=inst,
                type_map=None,
                mpp=mpp,
                group=f"monuseg/{png.stem}",
            )
        )
    if not out:
        raise FileNotFoundError(f"no MoNuSeg images (*.png) in {img_dir}")
    return out


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; TIFFs Pillow cannot open are read with tifffile."""
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
            out.append(NucleiSample(name, "pannuke", np.ascontiguousarray(img), relabel(inst), tmap, mpp, name))
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
        image = read_image(img_path)
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
                inst_map=relabel(inst.astype(np.int64)),
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
        image = read_image(img_path)
        polys = _geojson_polygons(ann)
        inst = relabel(rasterise_rings([p for p, _ in polys], range(1, len(polys) + 1), image.shape[:2]))
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
    return NucleiSample(s.name, s.source, np.ascontiguousarray(img), relabel(inst.astype(np.int64)),
                        None if tmap is None else tmap.astype(np.int32), target_mpp, s.group)
