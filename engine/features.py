"""Per-slide feature files (HDF5) and the versioned embedding cache they form.

Layout (what CLAM / Trident users already read):

- ``features``: (N, D) float32 tile embeddings
- ``coords``: (N, 2) int64 top-left corners in level-0 pixels (x, y)
- ``grid_index``: (N, 2) int64 (column, row) on the tile lattice
- ``tissue_fraction``, ``artefact_fraction``, ``quality/blur``, ``quality/background``, ``quality/dark``: (N,)
- attributes: ``patch_size`` (pixels at the target MPP), ``patch_size_level0``, ``target_mpp``, ``mpp``
  (level 0), ``backbone``, ``weights_hash``, ``preprocessing_hash``, ``cache_key``, ``slide_fingerprint``,
  ``package_version``, ``stride_level0``, ``slide_dimensions``, ``complete``, ``data_sha256`` (of
  ``features`` and ``coords``, checked before a file is reused)

A file is written to a temporary name and renamed when every tile is in, so a reader only ever sees
complete files; ``cache_key`` says which backbone, weights, preprocessing, resolution, package version
and slide produced it. A run whose key matches an existing file reuses it without backbone work.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ("FeatureWriter", "read_features", "cache_key", "slide_fingerprint", "cached", "verify_features",
           "FEATURE_SCHEMA")

#: bump when the file layout or the meaning of a field changes: old files then miss the cache
FEATURE_SCHEMA = 2  # 2: data checksum, slide fingerprint with content samples and mtime


#: content samples of a slide fingerprint beside its first and last MiB (spread over the file, so a
#: slide replaced by another image of the same size and header is still told apart)
_FINGERPRINT_SAMPLES = 16
_SAMPLE_BYTES = 64 << 10


def slide_fingerprint(path: str | os.PathLike[str], chunk: int = 1 << 20, *, mtime: bool = False) -> str:
    """cheap identity of a slide file: size + SHA-256 of its first and last MiB (header and directories
    of TIFF-like files) and of 16 evenly spread 64 KiB samples (tile data); with ``mtime`` also the
    modification time, so that a slide rewritten in place under the same name is never taken for the
    old one (cache and finished-slide keys use that form; shadow mode counts copies as one slide and
    uses the content alone)"""
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
    return h.hexdigest()[:32]


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


def cache_key(*, backbone: str, weights_hash: str, preprocessing: dict[str, Any], slide: str,
              version: str) -> str:
    """the versioned cache key: backbone + weights + preprocessing (incl. resolution) + version + slide"""
    doc = {"schema": FEATURE_SCHEMA, "backbone": backbone, "weights": weights_hash,
           "preprocessing": _canonical(preprocessing), "slide": slide, "version": version}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def preprocessing_hash(preprocessing: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_canonical(preprocessing), sort_keys=True).encode()).hexdigest()[:16]


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

    def __init__(self, dest: str | os.PathLike[str], n_tiles: int, dim: int, attrs: dict[str, Any],
                 arrays: dict[str, np.ndarray]) -> None:
        import h5py

        if n_tiles < 0 or dim <= 0:
            raise ConfigError(f"n_tiles={n_tiles}, dim={dim} must be >= 0 and > 0")
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        from .io import RUN_ID, TMP_PREFIX

        self.tmp = self.dest.with_name(f"{TMP_PREFIX}{self.dest.name}.{RUN_ID}")
        self.n = n_tiles
        self._written = np.zeros(n_tiles, bool)
        # no timestamps in object headers: the same inputs give byte-identical files
        self._f = h5py.File(self.tmp, "w", track_order=True)
        chunk_rows = max(1, min(n_tiles, 256))
        self._feat = self._f.create_dataset("features", shape=(n_tiles, dim), dtype="float32",
                                            chunks=(chunk_rows, dim) if n_tiles else None, track_times=False)
        self._quality: dict[str, Any] = {}
        for name, arr in arrays.items():
            self._f.create_dataset(name, data=arr, track_times=False)
        for k, v in attrs.items():
            self._f.attrs[k] = v
        self._f.attrs["complete"] = False

    def write(self, indices: np.ndarray, features: np.ndarray, quality: dict[str, np.ndarray] | None = None):
        from .io import write_guard

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
        from .io import write_guard

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
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.dest)
        return self.dest

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:  # already closed
            pass
        self.tmp.unlink(missing_ok=True)


@dataclass
class FeatureFile:
    """a feature file read back"""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray]


def read_features(path: str | os.PathLike[str]) -> FeatureFile:
    import h5py

    with h5py.File(path, "r") as f:
        arrays: dict[str, np.ndarray] = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name not in ("features", "coords"):
                arrays[name] = obj[()]

        f.visititems(visit)
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
        return FeatureFile(features=f["features"][()], coords=f["coords"][()], attrs=attrs, arrays=arrays)
