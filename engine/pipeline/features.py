"""Per-slide feature files (HDF5) and the versioned embedding cache they form.

Layout (what CLAM / Trident users already read):

- ``features``: (N, D) float32 tile embeddings
- ``coords``: (N, 2) int64 top-left corners in level-0 pixels (x, y)
- ``grid_index``: (N, 2) int64 (column, row) on the tile lattice
- ``tissue_fraction``, ``artefact_fraction``, ``quality/blur``, ``quality/background``, ``quality/dark``: (N,)
- root attributes: ``patch_size`` (pixels at the target MPP), ``patch_size_level0``, ``target_mpp``, ``mpp``
  (level 0), ``backbone``, ``weights_hash``, ``preprocessing_hash``, ``cache_key``, ``slide_fingerprint``,
  ``slide_name`` and ``slide_path`` (escaped where not UTF-8: :func:`~.io.escape_path`),
  ``package_version``, ``stride_level0``, ``slide_dimensions``, ``complete``, ``data_sha256`` (of
  ``features`` and ``coords``, checked before a file is reused)
- attributes of the ``coords`` dataset, where Trident and CLAM look for them (:func:`coords_attributes`):
  Trident's ``patch_size``, ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``overlap``, ``name``, ``level0_width``, ``level0_height``; CLAM's ``patch_level``, ``downsample``,
  ``level_dim``, ``downsampled_level_dim``; and ``patch_size_level0_xy`` (the footprint per axis, which
  differs from the square ``patch_size_level0`` when the slide's pixels are not square)

CLAM's MIL dataset reads ``DATA_DIR/h5_files/<slide>.h5`` (h5 mode) or ``DATA_DIR/pt_files/<slide>.pt``:
:func:`write_clam_layout` adds both beside ``features/`` without copying the HDF5 files. Trident's
``Processor`` looks in ``features_<encoder>/`` and ``patches/<slide>_patches.h5``:
:func:`write_trident_layout`.

A file is written to a temporary name and renamed when every tile is in, so a reader only ever sees
complete files; ``cache_key`` says which backbone, weights, preprocessing, resolution, package version
and slide produced it. A run whose key matches an existing file reuses it without backbone work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.io import AtomicFile, atomic_path, write_guard

__all__ = ("FeatureWriter", "read_features", "cache_key", "slide_fingerprint", "cached", "verify_features",
           "feature_owner", "coords_attributes", "write_clam_layout", "write_trident_layout", "FEATURE_SCHEMA")

#: bump when the file layout or the meaning of a field changes: old files then miss the cache
#: (2 on both lines of work: Trident / CLAM attributes on ``coords``, and separately the data checksum
#: with the content-sampled, mtime-bound slide fingerprint; 3: both together)
FEATURE_SCHEMA = 3


#: content samples of a slide fingerprint beside its first and last MiB (spread over the file, so a
#: slide replaced by another image of the same size and header is still told apart)
_FINGERPRINT_SAMPLES = 16
_SAMPLE_BYTES = 64 << 10


def slide_fingerprint(path: str | os.PathLike[str], chunk: int = 1 << 20, *, mtime: bool = False) -> str:
    """cheap identity of a slide file: size + SHA-256 of its first and last MiB (header and directories
    of TIFF-like files) and of 16 evenly spread 64 KiB samples (tile data); with ``mtime`` also the
    modification time, so that a slide rewritten in place under the same name is never taken for the
    old one, and (TIFF files) a sample of every tile, so that a slide replaced by another of the same
    size and mtime is told apart even where only tiles outside those samples differ (see
    :func:`_tile_samples`). Cache and finished-slide keys use that form; shadow mode counts copies as
    one slide and uses the content alone."""
    p = Path(path)
    st = p.stat()
    size = st.st_size
    h = hashlib.sha256(str(size).encode())
    if mtime:
        h.update(f"|{st.st_mtime_ns}".encode())
    with p.open("rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
        if size > 2 * chunk:
            span = size - 2 * chunk
            for k in range(_FINGERPRINT_SAMPLES):
                f.seek(chunk + span * k // _FINGERPRINT_SAMPLES)
                h.update(f.read(min(_SAMPLE_BYTES, span)))
    if mtime:
        h.update(_tile_samples(p))
    return h.hexdigest()[:32]


#: bytes read from the middle of every tile or strip for the key form of the fingerprint
_TILE_SAMPLE_BYTES = 64


def _tile_samples(path: Path) -> bytes:
    """digest of every page's tile (strip) offsets and byte counts and of 64 bytes from the middle of
    every tile: a re-encoded tile almost always changes its size, and an edit in place its middle.
    Empty for files that are not TIFF (DICOM: the first/last MiB and spread samples only) and for TIFFs
    that tifffile cannot parse (they fail when opened)."""
    with path.open("rb") as f:
        if f.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return b""

    import tifffile

    h = hashlib.sha256()
    tiff_log = logging.getLogger("tifffile")
    level = tiff_log.level
    tiff_log.setLevel(logging.ERROR)
    fd = os.open(path, os.O_RDONLY)
    try:
        with tifffile.TiffFile(str(path)) as tf:
            for page in tf.pages:
                offs = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                h.update(offs.tobytes() + b"|" + counts.tobytes())
                for o, c in zip(offs.tolist(), counts.tolist()):
                    if c > 0:
                        mid = o + max(0, (c - _TILE_SAMPLE_BYTES) // 2)
                        h.update(os.pread(fd, min(c, _TILE_SAMPLE_BYTES), mid))
    except Exception:  # not parseable: opening the slide fails and names why
        return b"unparsed"
    finally:
        os.close(fd)
        tiff_log.setLevel(level)
    return h.digest()


def _canonical(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 9)
    return obj


def cache_key(*, backbone: str, weights_hash: str, preprocessing: JsonDict, slide: str,
              version: str) -> str:
    """the versioned cache key: backbone + weights + preprocessing (incl. resolution) + version + slide"""
    doc = {"schema": FEATURE_SCHEMA, "backbone": backbone, "weights": weights_hash,
           "preprocessing": _canonical(preprocessing), "slide": slide, "version": version}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def preprocessing_hash(preprocessing: JsonDict) -> str:
    return hashlib.sha256(json.dumps(_canonical(preprocessing), sort_keys=True).encode()).hexdigest()[:16]


def _magnification(mpp: float) -> np.int64 | np.float64:
    """objective power in Trident's convention (10 / um per px: 0.25 um/px is 40x); an integer, as
    Trident writes it, unless that would change the pixel size a reader derives from it"""
    mag = 10.0 / float(mpp)
    if abs(mag - round(mag)) < 1e-6:
        return np.int64(round(mag))
    return np.float64(mag)


def coords_attributes(*, name: str, tile_size: int, target_mpp: float, level0_size: tuple[int, int],
                      stride: tuple[int, int], slide_dimensions: tuple[int, int],
                      mpp: tuple[float, float] | None) -> JsonDict:
    """attributes of the ``coords`` dataset, with the names and dtypes Trident and CLAM read there

    Trident (``coords`` attributes of its patch-feature files): ``patch_size`` (pixels at the target
    magnification), ``patch_size_level0`` (one integer: the footprint side in level-0 pixels),
    ``level0_magnification`` / ``target_magnification`` (10 / MPP), ``overlap`` (pixels shared by
    neighbouring patches, at the target magnification), ``name`` (slide name without extension),
    ``level0_width`` / ``level0_height``. CLAM: ``patch_level`` (0: coordinates and footprint are
    level-0 pixels), ``downsample``, ``level_dim``, ``downsampled_level_dim``, ``name``.

    Pixels need not be square (the DICOM test slide: 4.64 x 5.69 um/px, a 24 x 20 px footprint):
    ``patch_size_level0`` is then the width, as both tools assume square footprints, and
    ``patch_size_level0_xy`` holds (width, height). The magnifications follow the x axis.
    """
    w0, h0 = (int(v) for v in level0_size)
    mpp_x = float(mpp[0]) if mpp else float(target_mpp) * w0 / int(tile_size)
    overlap = int(tile_size) - int(round(int(stride[0]) * int(tile_size) / w0))
    W, H = (int(v) for v in slide_dimensions)
    return {
        # Trident
        "patch_size": np.int64(tile_size),
        "patch_size_level0": np.int64(w0),
        "level0_magnification": _magnification(mpp_x),
        "target_magnification": _magnification(target_mpp),
        "overlap": np.int64(max(overlap, 0)),
        "name": str(name),
        "level0_width": np.int64(W),
        "level0_height": np.int64(H),
        # both axes, where a single number cannot say it
        "patch_size_level0_xy": np.array([w0, h0], np.int64),
        # CLAM
        "patch_level": np.int64(0),
        "downsample": np.array([1.0, 1.0], np.float64),
        "level_dim": np.array([W, H], np.int64),
        "downsampled_level_dim": np.array([W, H], np.int64),
    }


def cached(path: str | os.PathLike[str], key: str) -> bool:
    """True when ``path`` is a complete, intact feature file written under ``key``"""
    import h5py

    p = Path(path)
    if not p.is_file():
        return False
    try:
        with h5py.File(p, "r") as f:
            if not (bool(f.attrs.get("complete", False)) and f.attrs.get("cache_key") == key):
                return False
    except OSError:  # unreadable leftovers are not a cache hit
        return False
    return verify_features(p) is None


def feature_owner(path: str | os.PathLike[str]) -> str | None:
    """the slide path a feature file records (``slide_path``), None when there is no file or no record"""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            v = f.attrs.get("slide_path")
    except (OSError, KeyError, ValueError, TypeError):
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "backslashreplace")
    return v if isinstance(v, str) and v else None


def _data_sha256(f: Any, rows: int = 4096) -> str:
    """checksum of an open file's ``features`` (shape, then rows in blocks: bounded memory) and ``coords``"""
    feat, coords = f["features"], f["coords"]
    h = hashlib.sha256(f"{feat.shape}|{feat.dtype}|{coords.shape}|{coords.dtype}".encode())
    for start in range(0, feat.shape[0], rows):
        h.update(np.ascontiguousarray(feat[start:start + rows]).tobytes())
    h.update(np.ascontiguousarray(coords[()]).tobytes())
    return h.hexdigest()


def verify_features(path: str | os.PathLike[str]) -> str | None:
    """what is wrong with a feature file (unreadable, incomplete, shapes that disagree, data that no
    longer matches its checksum), or None when it is intact"""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if not bool(f.attrs.get("complete", False)):
                return "incomplete feature file"
            if "features" not in f or "coords" not in f:
                return "feature file without features/coords"
            feat, coords = f["features"], f["coords"]
            if feat.ndim != 2 or coords.shape != (feat.shape[0], 2):
                return f"features {feat.shape} do not match coords {coords.shape}"
            want = f.attrs.get("data_sha256")
            if want is None:
                return "feature file without a data checksum"
            if _data_sha256(f) != want:
                return "feature data do not match their checksum"
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return f"unreadable feature file ({exc})"
    return None


class FeatureWriter:
    """streams one slide's features into a temporary HDF5 file; ``commit`` renames it into place

    Rows are written by tile index, so the file is identical whatever order batches arrive in.
    Host memory stays at one batch: nothing is accumulated here.
    """

    def __init__(self, dest: str | os.PathLike[str], n_tiles: int, dim: int, attrs: JsonDict,
                 arrays: dict[str, np.ndarray], array_attrs: dict[str, JsonDict] | None = None) -> None:
        import h5py

        if n_tiles < 0 or dim <= 0:
            raise ConfigError(f"n_tiles={n_tiles}, dim={dim} must be >= 0 and > 0")
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)

        self._file = AtomicFile(self.dest)
        self.tmp = self._file.tmp
        self.n = n_tiles
        self._written = np.zeros(n_tiles, bool)
        # no timestamps in object headers: the same inputs give byte-identical files
        self._f = h5py.File(self.tmp, "w", track_order=True)
        chunk_rows = max(1, min(n_tiles, 256))
        self._feat = self._f.create_dataset("features", shape=(n_tiles, dim), dtype="float32",
                                            chunks=(chunk_rows, dim) if n_tiles else None, track_times=False)
        self._quality: JsonDict = {}
        for name, arr in arrays.items():
            ds = self._f.create_dataset(name, data=arr, track_times=False)
            for k, v in (array_attrs or {}).get(name, {}).items():
                ds.attrs[k] = v
        for k, v in attrs.items():
            self._f.attrs[k] = v
        self._f.attrs["complete"] = False

    def write(self, indices: np.ndarray, features: np.ndarray, quality: dict[str, np.ndarray] | None = None):
        with write_guard(self.dest):
            self._write(indices, features, quality)

    def _write(self, indices: np.ndarray, features: np.ndarray, quality: dict[str, np.ndarray] | None) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        if features.shape[0] != idx.shape[0]:
            raise ConfigError(f"features rows {features.shape[0]} != indices {idx.shape[0]}")
        order = np.argsort(idx)  # h5py fancy indexing wants increasing indices
        idx_sorted = idx[order]
        self._feat[idx_sorted] = np.asarray(features, np.float32)[order]
        for name, values in (quality or {}).items():
            ds = self._quality.get(name)
            if ds is None:
                ds = self._f.create_dataset(f"quality/{name}", shape=(self.n,), dtype="float32",
                                            track_times=False)
                self._quality[name] = ds
            ds[idx_sorted] = np.asarray(values, np.float32)[order]
        self._written[idx] = True

    @property
    def complete(self) -> bool:
        return bool(self._written.all())

    def commit(self) -> Path:
        if not self.complete:
            missing = int((~self._written).sum())
            self.abort()
            raise RuntimeError(f"{self.dest}: {missing} of {self.n} tiles were never written")
        try:
            with write_guard(self.dest):
                return self._commit()
        except BaseException:
            self.abort()  # a full disk must not leave a half-written temporary behind
            raise

    def _commit(self) -> Path:
        self._f.attrs["complete"] = True
        self._f.flush()
        self._f.attrs["data_sha256"] = _data_sha256(self._f)  # what a later reuse checks the file against
        self._f.flush()
        self._f.close()
        return self._file.commit()

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:  # already closed
            pass
        self._file.abort()


@dataclass
class FeatureFile:
    """a feature file read back"""

    features: np.ndarray
    coords: np.ndarray
    attrs: JsonDict
    arrays: dict[str, np.ndarray]
    coords_attrs: JsonDict = field(default_factory=dict)


def _plain(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v


def read_features(path: str | os.PathLike[str]) -> FeatureFile:
    import h5py

    with h5py.File(path, "r") as f:
        arrays: dict[str, np.ndarray] = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name not in ("features", "coords"):
                arrays[name] = obj[()]

        f.visititems(visit)
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        coords_attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
        return FeatureFile(features=f["features"][()], coords=f["coords"][()], attrs=attrs, arrays=arrays,
                           coords_attrs=coords_attrs)


def write_clam_layout(out_dir: str | os.PathLike[str], pt_files: bool = True) -> list[Path]:
    """make ``out_dir`` a CLAM feature directory: ``h5_files`` (a relative link to ``features``, so
    the HDF5 files are not copied and stay current) and, with ``pt_files``, ``pt_files/<slide>.pt``
    (the ``features`` tensor, what CLAM's MIL dataset loads by default). Returns the ``.pt`` files.

    Only complete feature files are exported; a ``.pt`` file is rewritten when its HDF5 file is newer.
    """
    out = Path(out_dir)
    feats = out / "features"
    if not feats.is_dir():
        raise ConfigError(f"{feats}: no feature folder to export in CLAM's layout")
    link = out / "h5_files"
    if link.is_symlink():
        if Path(os.readlink(link)) != Path("features"):
            raise ConfigError(f"{link}: already links to {os.readlink(link)}, not to features/")
    elif link.exists():
        raise ConfigError(f"{link}: exists and is not a link to features/; move it away first")
    else:
        link.symlink_to("features", target_is_directory=True)
    written: list[Path] = []
    if not pt_files:
        return written
    import h5py
    import torch


    pt_dir = out / "pt_files"
    pt_dir.mkdir(exist_ok=True)
    for h5 in sorted(feats.glob("*.h5")):
        if h5.name.startswith("."):
            continue
        dest = pt_dir / f"{h5.stem}.pt"
        if dest.is_file() and dest.stat().st_mtime_ns >= h5.stat().st_mtime_ns:
            continue
        with h5py.File(h5, "r") as f:
            if not bool(f.attrs.get("complete", False)):
                continue
            x = torch.from_numpy(f["features"][()])
        with atomic_path(dest) as tmp:
            torch.save(x, tmp)
        written.append(dest)
    return written


def write_trident_layout(out_dir: str | os.PathLike[str], encoder: str | None = None) -> list[Path]:
    """make ``out_dir`` a Trident coordinates folder: ``features_<encoder>/<slide>.h5`` (the patch features
    Trident's ``Processor`` finds, and skips as already extracted) and ``patches/<slide>_patches.h5`` (the
    patch coordinates it pairs them with). Trident's jobs then take ``job_dir`` = the parent of ``out_dir``
    and ``coords_dir`` = its name. ``encoder`` defaults to each file's ``backbone`` (``hoptimus0`` is
    Trident's name for H-optimus-0 too). Returns the feature files written.

    Slide encoders that Trident runs on these files (CARE, TITAN, GigaPath) place each tile on a grid at
    ``coords // patch_size_level0``. Tiles that overlap (triage: 224 px tiles 160 px apart) would then
    share grid cells (the bundled slide's 123 tiles fell on 67), so here ``patch_size_level0`` is the
    tiles' level-0 step (rounded down: consecutive tiles are at least that far apart, so every tile keeps
    its own cell), with the footprint kept as ``patch_footprint_level0`` and the step per axis as
    ``step_level0``. Without overlap the two are the same and nothing changes. Files are copies (the
    attributes differ from ``features/``), rewritten when their source is newer; incomplete files are
    skipped.
    """
    import h5py


    out = Path(out_dir)
    feats = out / "features"
    if not feats.is_dir():
        raise ConfigError(f"{feats}: no feature folder to export in Trident's layout")
    written: list[Path] = []
    for h5 in sorted(feats.glob("*.h5")):
        if h5.name.startswith("."):
            continue
        with h5py.File(h5, "r") as f:
            if not bool(f.attrs.get("complete", False)):
                continue
            enc = encoder or str(f.attrs.get("backbone", "") or "unknown")
            dest = out / f"features_{enc}" / h5.name
            if dest.is_file() and dest.stat().st_mtime_ns >= h5.stat().st_mtime_ns:
                continue
            features, coords = f["features"][()], f["coords"][()]
            attrs = dict(f["coords"].attrs)
            stride = np.asarray(f.attrs.get("stride_level0", attrs["patch_size_level0_xy"]), np.int64).ravel()
        footprint = int(attrs["patch_size_level0"])
        step = np.minimum(stride, np.asarray(attrs["patch_size_level0_xy"], np.int64).ravel()[: stride.size])
        attrs.update(patch_footprint_level0=np.int64(footprint), step_level0=step.astype(np.int64),
                     patch_size_level0=np.int64(max(1, int(step.min()))))
        dest.parent.mkdir(parents=True, exist_ok=True)
        for path, with_features in ((dest, True), (out / "patches" / f"{h5.stem}_patches.h5", False)):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as g:
                if with_features:
                    g.create_dataset("features", data=features, track_times=False)
                ds = g.create_dataset("coords", data=coords, track_times=False)
                for k, v in attrs.items():
                    ds.attrs[k] = v
        written.append(dest)
    return written
