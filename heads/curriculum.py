"""Curriculum-learning sampler for head training (optional).

Orders training samples easy-to-hard by a per-sample difficulty — a fixed score such as nucleus
instance density (:func:`instance_density`) or the running training loss fed back with
:meth:`CurriculumSampler.update` — and exposes only the easiest fraction of the dataset early on. The
fraction follows the competence functions of Platanios et al. (NAACL 2019): ``linear``
``c(t) = min(1, c0 + (1 - c0) t / T)`` and ``root`` ``c(t) = min(1, sqrt(c0² + (1 - c0²) t / T))``,
with ``c0 = start_fraction`` and ``T = warmup_epochs``. Plug it into a ``DataLoader(sampler=...)`` and
call :meth:`~CurriculumSampler.set_epoch` every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Sampler

from cellvit_optimus.engine.errors import ConfigError

__all__ = ("CurriculumSampler", "instance_density")

Pacing = Literal["linear", "root"]


def instance_density(inst_maps: Iterable[np.ndarray]) -> np.ndarray:
    """Nucleus instances per megapixel of each ``(H, W)`` instance map (0 background) — a difficulty."""
    out = []
    for m in inst_maps:
        m = np.asarray(m)
        n = np.unique(m[m > 0]).size
        out.append(n / max(m.size, 1) * 1e6)
    return np.asarray(out, dtype=np.float64)


class CurriculumSampler(Sampler[int]):
    """Yield the easiest ``fraction(epoch)`` of the dataset, shuffled, growing to all of it.

    Parameters
    ----------
    num_samples : int
        Dataset length.
    difficulty : sequence of float, optional
        Per-sample difficulty (higher is harder). None starts every sample at 0 (use :meth:`update`):
        samples without a loss yet count as easiest, so they are scored early.
        Ties are broken by a seeded permutation, not by index.
    start_fraction : float
        Fraction of the sorted dataset available at epoch 0, in (0, 1].
    warmup_epochs : int
        Epoch from which the whole dataset is used (0 disables the curriculum).
    pacing : {"linear", "root"}
    seed : int
        Seeds the tie-break and the per-epoch shuffle (``seed + epoch``): same seed, same order.
    momentum : float
        Running-loss smoothing for :meth:`update`: ``d <- m d + (1 - m) loss`` (first update sets ``d``).
    """

    def __init__(
        self,
        num_samples: int,
        difficulty: Sequence[float] | np.ndarray | None = None,
        *,
        start_fraction: float = 0.3,
        warmup_epochs: int = 10,
        pacing: Pacing = "linear",
        seed: int = 0,
        momentum: float = 0.9,
    ) -> None:
        if num_samples <= 0:
            raise ConfigError(f"num_samples={num_samples} must be positive")
        if not 0.0 < start_fraction <= 1.0:
            raise ConfigError(f"start_fraction={start_fraction} must be in (0, 1]")
        if warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs={warmup_epochs} must be >= 0")
        if pacing not in ("linear", "root"):
            raise ConfigError(f"pacing={pacing!r}, expected 'linear' or 'root'")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum={momentum} must be in [0, 1)")
        if difficulty is None:
            d = np.zeros(num_samples, dtype=np.float64)
        else:
            d = np.asarray(difficulty, dtype=np.float64).reshape(-1)
            if d.size != num_samples:
                raise ConfigError(f"difficulty has {d.size} entries for num_samples={num_samples}")
            if not np.all(np.isfinite(d)):
                raise ConfigError("difficulty must be finite")
        self.num_samples = num_samples
        self.difficulty = d
        self._seen = (
            np.zeros(num_samples, dtype=bool) if difficulty is None else np.ones(num_samples, dtype=bool)
        )
        self.start_fraction = start_fraction
        self.warmup_epochs = warmup_epochs
        self.pacing = pacing
        self.seed = seed
        self.momentum = momentum
        self.epoch = 0
        self._tiebreak = np.random.default_rng(seed).permutation(num_samples)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ConfigError(f"epoch={epoch} must be >= 0")
        self.epoch = epoch

    def fraction(self, epoch: int | None = None) -> float:
        """Competence ``c(epoch)`` in (0, 1]."""
        t = self.epoch if epoch is None else epoch
        if self.warmup_epochs == 0 or t >= self.warmup_epochs:
            return 1.0
        c0 = self.start_fraction
        if self.pacing == "linear":
            return min(1.0, c0 + (1.0 - c0) * t / self.warmup_epochs)
        return min(1.0, math.sqrt(c0 * c0 + (1.0 - c0 * c0) * t / self.warmup_epochs))

    def available(self, epoch: int | None = None) -> int:
        """How many samples the sampler yields at ``epoch`` (at least 1)."""
        return max(1, math.ceil(self.fraction(epoch) * self.num_samples - 1e-9))

    def ordered(self) -> np.ndarray:
        """All indices sorted easy-to-hard (ties by the seeded permutation)."""
        return np.lexsort((self._tiebreak, self.difficulty))

    def update(
        self,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        losses: Sequence[float] | np.ndarray | torch.Tensor,
    ) -> None:
        """Fold per-sample training losses into the running difficulty."""
        idx = np.asarray(
            indices.detach().cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64
        ).reshape(-1)
        val = np.asarray(
            losses.detach().float().cpu() if isinstance(losses, torch.Tensor) else losses, dtype=np.float64
        ).reshape(-1)
        if idx.size != val.size:
            raise ValueError(f"update: {idx.size} indices but {val.size} losses")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"update: index out of range 0..{self.num_samples - 1}")
        if not np.all(np.isfinite(val)):
            raise ValueError("update: losses must be finite")
        for i, v in zip(
            idx.tolist(), val.tolist(), strict=True
        ):  # sequential so repeated indices fold in order
            if self._seen[i]:
                self.difficulty[i] = self.momentum * self.difficulty[i] + (1.0 - self.momentum) * v
            else:
                self.difficulty[i] = v
                self._seen[i] = True

    def __iter__(self) -> Iterator[int]:
        pool = self.ordered()[: self.available()]
        rng = np.random.default_rng((self.seed, self.epoch))
        return iter(pool[rng.permutation(pool.size)].tolist())

    def __len__(self) -> int:
        return self.available()
