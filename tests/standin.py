"""A stand-in backbone runner with a known cost per batch, for scheduler tests and benchmarks.

It has the attributes the extraction job reads from a real runner (preset name, normalisation, dtype,
weights id, embedding size) and "computes" by sleeping a fixed time per batch, which, like a GPU
forward, releases the GIL and costs no host CPU. Its embedding is a cheap deterministic function of
the tile pixels, so files written with it are still checkable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Preset:
    name: str = "standin"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)


@dataclass
class _Out:
    embedding: np.ndarray


class StandInRunner:
    def __init__(self, seconds_per_batch: float = 0.0, dim: int = 32) -> None:
        self.seconds_per_batch = seconds_per_batch
        self.preset = _Preset()
        self.dtype = "fp32"
        self.device = "cpu"
        self.weights_id = f"standin:{dim}"
        self.embed_dim = dim
        self.stain_norm = None
        self.calls = 0
        self.tiles_processed = 0

    def __call__(self, tiles: np.ndarray, tokens: bool = False) -> _Out:
        if self.seconds_per_batch:
            time.sleep(self.seconds_per_batch)
        self.calls += 1
        self.tiles_processed += len(tiles)
        # a sparse subsample keeps the stand-in's own cost negligible next to its known sleep
        means = tiles[:, ::8, ::8].reshape(len(tiles), -1, 3).mean(axis=1, dtype=np.float32)  # (n, 3)
        reps = -(-self.embed_dim // 3)
        return _Out(np.tile(means, (1, reps))[:, : self.embed_dim].astype(np.float32))
