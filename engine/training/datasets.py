"""Loaders for the real annotated nuclei sets in ``shared/data/nuclei`` (CoNSeP patches, MoNuSeg train).

Used by the kernel tests (round trips, metrics), the head training loops and the benchmarks. Plain
numpy / Pillow / scipy.io only (no torch), so they can be imported anywhere.

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

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = (
    "CONSEP_CLASSES",
    "NucleiSample",
    "default_nuclei_root",
    "load_consep",
    "load_monuseg",
)

#: class names of the merged CoNSeP scheme (HoVer-Net), index = type id (0 = background)
CONSEP_CLASSES: tuple[str, ...] = ("background", "other", "inflammatory", "epithelial", "spindle-shaped")

#: nominal resolution of CoNSeP (40x); MoNuSeg reads its own from the XML
CONSEP_MPP: float = 0.25


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
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nuclei"


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"nuclei data folder not found: {path}")
    return path


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _relabel(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous 1..N relabelling; returns the new map and the sorted old ids (index k -> new id k+1)."""
    ids = np.unique(inst)
    ids = ids[ids > 0]
    lut = np.zeros(int(inst.max()) + 1 if inst.size else 1, dtype=np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[inst].astype(np.int32, copy=False), ids


def load_consep(root: Path | None = None) -> list[NucleiSample]:
    """Load all CoNSeP patches (sorted by name).

    Parameters
    ----------
    root : Path, optional
        The ``nuclei`` folder (holding ``consep-patches/``); default :func:`default_nuclei_root`.

    Returns
    -------
    list of NucleiSample
        ``type_map`` uses the merged scheme of :data:`CONSEP_CLASSES`.

    Raises
    ------
    FileNotFoundError
        The folder or one of a patch's files is missing (the message names the path).
    """
    import scipy.io as sio

    base = _require_dir(Path(root) if root is not None else default_nuclei_root()) / "consep-patches"
    _require_dir(base)
    inst_dir = _require_dir(base / "inst")
    out: list[NucleiSample] = []
    for npy in sorted(inst_dir.glob("*.npy")):
        stem = npy.stem
        img_path = base / "images" / f"{stem}.jpg"
        mat_path = base / "type_mat" / f"{stem}.mat"
        for p in (img_path, mat_path):
            if not p.is_file():
                raise FileNotFoundError(f"CoNSeP patch {stem}: missing {p}")
        raw = np.load(npy).astype(np.int32, copy=False)
        inst, old_ids = _relabel(raw)
        types = np.asarray(sio.loadmat(str(mat_path))["inst_type"]).reshape(-1).astype(np.int32)
        if types.size != old_ids.size:
            raise ValueError(
                f"{mat_path}: inst_type has {types.size} entries but {npy} has {old_ids.size} instances"
            )
        lut = np.zeros(old_ids.size + 1, dtype=np.int32)
        lut[1:] = types
        type_map = lut[inst]
        image = _read_rgb(img_path)
        if image.shape[:2] != inst.shape:
            raise ValueError(f"{img_path}: image shape {image.shape[:2]} != instance map shape {inst.shape}")
        group = "consep/" + "_".join(stem.split("_")[:2])  # test_<image>_<patch> -> test_<image>
        out.append(
            NucleiSample(
                name=f"consep/{stem}",
                source="consep",
                image=image,
                inst_map=inst,
                type_map=type_map,
                mpp=CONSEP_MPP,
                group=group,
            )
        )
    if not out:
        raise FileNotFoundError(f"no CoNSeP patches (*.npy) in {inst_dir}")
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
    return _relabel(inst)[0]


def load_monuseg(root: Path | None = None) -> list[NucleiSample]:
    """Load the MoNuSeg training images with their XML polygons rasterised (sorted by name).

    Parameters
    ----------
    root : Path, optional
        The ``nuclei`` folder (holding ``monuseg-train/``); default :func:`default_nuclei_root`.

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
    for png in sorted(img_dir.glob("*.png")):
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
