"""Training tiles and their cached backbone tokens: the fixed tiles of the annotated images at the nuclei
MPP (:func:`make_tiles`), the fingerprint they are cached under and the HDF5 :class:`TokenCache` of the
frozen backbone's token maps, so the frozen-backbone loop (:mod:`.train`) pays for the backbone once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.pipeline import PAD_VALUE, tile_origins
from cellvit_optimus.engine.training.datasets import NucleiSample, relabel, resample_sample

__all__ = ("TOKEN_CACHE_SCHEMA", "TileSet", "TokenCache", "dataset_fingerprint", "make_tiles")

logger = logging.getLogger(__name__)

#: bump when the token cache layout or the tiling changes meaning: old caches then miss
TOKEN_CACHE_SCHEMA = 1


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
                insts.append(relabel(inst[y:y + tile, x:x + tile].astype(np.int64)))
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

    The file is ``<cache_dir>/tokens-<key>.h5``; ``key`` is ``pipeline.features.cache_key`` of the
    backbone preset, weights hash, preprocessing (normalisation, blocks, tile size, nuclei MPP), the
    dataset fingerprint and the package version. :meth:`load` computes whatever is missing (written to
    a temporary name and renamed when complete) and returns the maps; a second call, or a second run
    on the same data, reads the file and makes no backbone call.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], runner: Any, tiles: TileSet, nuclei_mpp: float) -> None:
        from cellvit_optimus.engine import __version__
        from cellvit_optimus.engine.pipeline import cache_key

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
        calls0 = r.calls
        t0 = time.perf_counter()
        from cellvit_optimus.engine.io import atomic_path

        with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as f:
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
        self.backbone_calls += r.calls - calls0
        logger.info("token cache %s: %d tiles in %.1f s", self.path.name, n, time.perf_counter() - t0)
