"""Split conformal prediction sets (APS / RAPS) for nucleus types and tile or region labels.

Fitted on a calibration split of (probabilities, true labels); for a new input the set of labels
whose conformity score is within the calibrated quantile covers the true label with probability
>= 1 - alpha (marginally, or per class with ``class_conditional=True``), assuming the calibration
and test inputs are exchangeable. Set size is an uncertainty signal: more than one label means review.

Scores (Romano et al. 2020; Angelopoulos et al. 2021), with labels sorted by decreasing probability
and ``o(y)`` the 1-based rank of label ``y``::

    APS   E(x, y, u) = sum_{j < o(y)} p_(j) + u * p_(o(y))          (u = 1 when not randomised)
    RAPS  E(x, y, u) = APS + lam * max(0, o(y) - k_reg)

The calibration scores are kept (not only the quantile) so that any alpha can be asked for later;
the state is saved with the model and backbone ids and refused for others.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import numpy as np

from cellvit_optimus.engine.errors import ConfigError

from ._state import STATE_VERSION, check_ids, json_bytes, read_json

__all__ = ("SplitConformal", "conformal_quantile", "type_probabilities")

_KIND = "split_conformal"
ScoreName = Literal["aps", "raps"]


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """the ``ceil((n + 1)(1 - alpha)) / n`` empirical quantile (finite-sample correction).

    Returns ``inf`` when the calibration set is too small for that level (every label is then kept).
    """
    s = np.asarray(scores, dtype=np.float64)
    n = s.size
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha={alpha!r} must lie in (0, 1)")
    if n == 0:
        return math.inf
    k = math.ceil((n + 1) * (1.0 - alpha))
    if k > n:
        return math.inf
    return float(np.partition(s, k - 1)[k - 1])


def type_probabilities(type_scores: np.ndarray) -> np.ndarray:
    """per-nucleus type probabilities ``(N, K)`` from the kernels' ``type_scores`` ``(N, K + 1)`` (the
    mean class probabilities over each nucleus' pixels, background first): background dropped and
    rows renormalised (uniform where a row has no foreground mass). What the nucleus-type
    calibration is fitted on and what the engine feeds it."""
    s = np.asarray(type_scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"type_scores must be (N, K + 1) with K >= 1, got shape {s.shape}")
    s = s[:, 1:]
    tot = s.sum(axis=1, keepdims=True)
    return np.where(tot > 0, s / np.where(tot > 0, tot, 1.0), 1.0 / s.shape[1])


class SplitConformal:
    """split conformal classifier wrapper over predicted probabilities ``(N, K)``.

    Parameters
    ----------
    alpha : default miscoverage used by :meth:`predict_sets`
    score : ``"aps"`` or ``"raps"``
    randomized : randomised scores (exact coverage; sets may be empty if ``allow_empty``)
    lam, k_reg : RAPS penalty weight and the rank from which it applies
    class_conditional : one quantile per true class (coverage per class, larger sets for rare ones)
    allow_empty : keep empty sets; when False the top label is always included (slightly
        conservative, and an empty set is of no use to a reader)
    seed : seed of the randomisation, so that a tag is reproducible for the same input order
    """

    def __init__(
        self,
        alpha: float = 0.1,
        score: ScoreName = "raps",
        randomized: bool = True,
        lam: float = 0.1,
        k_reg: int = 1,
        class_conditional: bool = False,
        allow_empty: bool = False,
        seed: int = 0,
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"alpha={alpha!r} must lie in (0, 1)")
        if score not in ("aps", "raps"):
            raise ConfigError(f"score={score!r} is not one of 'aps', 'raps'")
        if not (np.isfinite(lam) and lam >= 0):
            raise ConfigError(f"lam={lam!r} must be a finite number >= 0")
        if int(k_reg) < 0:
            raise ConfigError(f"k_reg={k_reg!r} must be >= 0")
        self.alpha = float(alpha)
        self.score = score
        self.randomized = bool(randomized)
        self.lam = float(lam)
        self.k_reg = int(k_reg)
        self.class_conditional = bool(class_conditional)
        self.allow_empty = bool(allow_empty)
        self.seed = int(seed)
        self.n_classes: int | None = None
        self.cal_scores: np.ndarray | None = None
        self.cal_labels: np.ndarray | None = None
        self.model_id: str | None = None
        self.backbone_id: str | None = None
        self.weights_hash: str | None = None
        self.class_names: list[str] | None = None
        self.provenance: dict = {}

    # scores ---------------------------------------------------------------------------------
    def _all_scores(self, probs: np.ndarray, u: np.ndarray) -> np.ndarray:
        """conformity score of every label ``(N, K)`` given one uniform ``u`` per row."""
        p = np.asarray(probs, dtype=np.float64)
        order = np.argsort(-p, axis=1, kind="stable")
        ps = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(ps, axis=1) - ps
        e_sorted = before + u[:, None] * ps
        if self.score == "raps":
            rank = np.arange(1, p.shape[1] + 1)
            e_sorted = e_sorted + self.lam * np.maximum(0, rank - self.k_reg)[None, :]
        e = np.empty_like(e_sorted)
        np.put_along_axis(e, order, e_sorted, axis=1)
        return e

    def _uniforms(self, n: int, stream: int) -> np.ndarray:
        if not self.randomized:
            return np.ones(n)
        return np.random.default_rng([self.seed, stream]).random(n)

    def _check_probs(self, probs: np.ndarray) -> np.ndarray:
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2:
            raise ValueError(f"probs must be (N, K), got shape {p.shape}")
        if self.n_classes is not None and p.shape[1] != self.n_classes:
            raise ValueError(f"probs have {p.shape[1]} classes, the calibration had {self.n_classes}")
        return p

    # fit / predict --------------------------------------------------------------------------
    def fit(self, probs: np.ndarray, labels: np.ndarray) -> SplitConformal:
        """compute the calibration scores of the true labels."""
        p = np.asarray(probs, dtype=np.float64)
        y = np.asarray(labels).astype(np.int64)
        if p.ndim != 2 or y.shape != (p.shape[0],):
            raise ValueError(f"expected probs (N, K) and labels (N,), got {p.shape} and {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
            raise ValueError(f"labels must lie in [0, {p.shape[1]}), got range [{y.min()}, {y.max()}]")
        self.n_classes = p.shape[1]
        e = self._all_scores(p, self._uniforms(p.shape[0], 0))
        self.cal_scores = e[np.arange(y.size), y]
        self.cal_labels = y
        return self

    def quantiles(self, alpha: float | None = None) -> np.ndarray:
        """the calibrated threshold per class ``(K,)`` (all equal unless class-conditional)."""
        if self.cal_scores is None or self.cal_labels is None or self.n_classes is None:
            raise RuntimeError("SplitConformal is not fitted: call fit() or load() first")
        a = self.alpha if alpha is None else float(alpha)
        if not self.class_conditional:
            return np.full(self.n_classes, conformal_quantile(self.cal_scores, a))
        return np.array(
            [conformal_quantile(self.cal_scores[self.cal_labels == k], a) for k in range(self.n_classes)]
        )

    def predict_sets(self, probs: np.ndarray, alpha: float | None = None, stream: int = 1) -> np.ndarray:
        """prediction sets as a boolean mask ``(N, K)``; ``stream`` picks the randomisation stream."""
        p = self._check_probs(probs)
        q = self.quantiles(alpha)
        e = self._all_scores(p, self._uniforms(p.shape[0], stream))
        sets = e <= q[None, :]
        if not self.allow_empty and p.shape[0]:
            sets[np.arange(p.shape[0]), p.argmax(axis=1)] = True
        return sets

    @staticmethod
    def set_sizes(sets: np.ndarray) -> np.ndarray:
        return np.asarray(sets, dtype=bool).sum(axis=1)

    @staticmethod
    def coverage(sets: np.ndarray, labels: np.ndarray) -> float:
        s = np.asarray(sets, dtype=bool)
        y = np.asarray(labels).astype(np.int64)
        return float(s[np.arange(y.size), y].mean()) if y.size else math.nan

    # persistence ----------------------------------------------------------------------------
    def to_bytes(self, *, model_id: str, backbone_id: str, class_names: list[str] | None = None,
                 weights_hash: str | None = None, provenance: dict | None = None) -> bytes:
        """the JSON state file's bytes, with the ids it is valid for (``weights_hash``: the backbone
        weights, when the same backbone id can carry other weights) and what it was calibrated on
        (``provenance``); write them with ``cellvit_optimus.engine.io.atomic_write_bytes``"""
        if self.cal_scores is None or self.cal_labels is None:
            raise RuntimeError("SplitConformal is not fitted: nothing to save")
        return json_bytes({
            "kind": _KIND, "version": STATE_VERSION, "model_id": model_id, "backbone_id": backbone_id,
            "weights_hash": weights_hash, "provenance": provenance or {},
            "alpha": self.alpha, "score": self.score, "randomized": self.randomized, "lam": self.lam,
            "k_reg": self.k_reg, "class_conditional": self.class_conditional,
            "allow_empty": self.allow_empty, "seed": self.seed, "n_classes": self.n_classes,
            "class_names": class_names, "cal_scores": self.cal_scores.tolist(),
            "cal_labels": self.cal_labels.tolist(),
        })

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model_id: str | None = None,
             backbone_id: str | None = None, weights_hash: str | None = None) -> SplitConformal:
        """load a calibration state; refuses (StateMismatchError) one saved for other ids."""
        o = read_json(path, _KIND)
        check_ids(path, _KIND, o, model_id=model_id, backbone_id=backbone_id, weights_hash=weights_hash)
        c = cls(alpha=o["alpha"], score=o["score"], randomized=o["randomized"], lam=o["lam"],
                k_reg=o["k_reg"], class_conditional=o["class_conditional"],
                allow_empty=o["allow_empty"], seed=o["seed"])
        c.n_classes = int(o["n_classes"])
        c.cal_scores = np.asarray(o["cal_scores"], dtype=np.float64)
        c.cal_labels = np.asarray(o["cal_labels"], dtype=np.int64)
        c.model_id, c.backbone_id = o["model_id"], o["backbone_id"]
        c.weights_hash, c.class_names = o.get("weights_hash"), o.get("class_names")
        c.provenance = o.get("provenance", {})
        return c
