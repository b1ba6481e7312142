"""Out-of-domain detection: Mahalanobis distance of embeddings to a reference distribution.

The engine feeds backbone embeddings ``(N, D)`` of tiles from the reference (training-domain) data to
:meth:`MahalanobisOOD.fit`; at inference each tile's distance is compared with two thresholds taken
from reference quantiles (review above the ``review_quantile``, out-of-domain above the
``out_quantile``). The covariance is a shrinkage estimate (Ledoit-Wolf or OAS), so it is
well-conditioned even when D is close to N. Thresholds are quantiles of *cross-fitted* reference
distances (each fold scored by a model that did not see it): in-sample distances are optimistically
small, and thresholds taken from them would send ordinary in-domain tiles to review.

The state is bound to the backbone: it is saved with the backbone id and the weights hash, and
loading it for any other backbone raises :class:`StateMismatchError` naming both. It also records
the feature recipe it was fitted on (:mod:`.ood_features`: the embedding alone, or the embedding
next to tile statistics) and the tile resolution, so the engine builds the same feature at run time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cellvit_optimus.engine.errors import ConfigError, StateMismatchError

from ._state import STATE_VERSION, check_header, check_ids
from .ood_features import EMBEDDING, RECIPES

__all__ = ("MahalanobisOOD", "OODThresholds")

_KIND = "mahalanobis_ood"
Estimator = Literal["ledoit_wolf", "oas"]


@dataclass(frozen=True)
class OODThresholds:
    """distance thresholds: ``review`` <= ``out_of_domain``."""

    review: float
    out_of_domain: float


def _estimator(name: Estimator):
    from sklearn.covariance import OAS, LedoitWolf

    return {"ledoit_wolf": LedoitWolf, "oas": OAS}[name](assume_centered=False)


class MahalanobisOOD:
    """Mahalanobis OOD detector over any ``(N, D)`` embeddings.

    Parameters
    ----------
    estimator : ``"ledoit_wolf"`` or ``"oas"`` shrinkage covariance (scikit-learn)
    per_class : one mean and covariance per class label given to :meth:`fit`; the score is the
        distance to the nearest class
    standardize : z-score features with the reference mean/std first (shrinkage towards a scaled
        identity is not scale invariant, so unscaled features would be shrunk unevenly)
    review_quantile, out_quantile : reference quantiles giving the two thresholds
    cv_folds : folds of the cross-fitting used for the thresholds (>= 2)
    min_class_size : classes with fewer reference samples are folded into a pooled fit
    features : the feature recipe of the ``(N, D)`` inputs (:data:`.ood_features.RECIPES`), recorded in
        the state so that the engine builds the same feature when it scores tiles
    """

    def __init__(
        self,
        estimator: Estimator = "ledoit_wolf",
        per_class: bool = False,
        standardize: bool = True,
        review_quantile: float = 0.95,
        out_quantile: float = 0.995,
        cv_folds: int = 5,
        min_class_size: int = 10,
        seed: int = 0,
        features: str = EMBEDDING,
    ) -> None:
        if features not in RECIPES:
            raise ConfigError(f"features={features!r} is not one of {', '.join(map(repr, RECIPES))}")
        if estimator not in ("ledoit_wolf", "oas"):
            raise ConfigError(f"estimator={estimator!r} is not one of 'ledoit_wolf', 'oas'")
        if not 0.0 < review_quantile <= out_quantile < 1.0:
            raise ConfigError(
                f"quantiles review_quantile={review_quantile!r}, out_quantile={out_quantile!r} "
                "must satisfy 0 < review <= out < 1"
            )
        if int(cv_folds) < 2:
            raise ConfigError(f"cv_folds={cv_folds!r} must be >= 2")
        self.estimator: Estimator = estimator
        self.per_class = bool(per_class)
        self.standardize = bool(standardize)
        self.review_quantile = float(review_quantile)
        self.out_quantile = float(out_quantile)
        self.cv_folds = int(cv_folds)
        self.min_class_size = int(min_class_size)
        self.seed = int(seed)
        self.features = features
        self.backbone_id: str | None = None
        self.weights_hash: str | None = None
        self.tile_mpp: float | None = None
        self.provenance: dict = {}
        # fitted state
        self.shift_: np.ndarray | None = None  # (D,)
        self.scale_: np.ndarray | None = None  # (D,)
        self.means_: np.ndarray | None = None  # (C, D)
        self.precisions_: np.ndarray | None = None  # (C, D, D)
        self.ref_scores_: np.ndarray | None = None  # (N,) cross-fitted
        self.thresholds: OODThresholds | None = None

    # fitting ----------------------------------------------------------------------------------
    def _fit_components(
        self, x: np.ndarray, y: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        groups: list[np.ndarray]
        if self.per_class and y is not None:
            groups = []
            rest = np.zeros(x.shape[0], dtype=bool)
            for c in np.unique(y):
                sel = y == c
                if sel.sum() >= self.min_class_size:
                    groups.append(x[sel])
                else:
                    rest |= sel
            if rest.sum() >= self.min_class_size or not groups:
                groups.append(x[rest] if rest.any() else x)
        else:
            groups = [x]
        means, precs = [], []
        for g in groups:
            est = _estimator(self.estimator).fit(g)
            means.append(est.location_)
            precs.append(est.precision_)
        return np.stack(means), np.stack(precs)

    @staticmethod
    def _distances(z: np.ndarray, means: np.ndarray, precs: np.ndarray) -> np.ndarray:
        best = np.full(z.shape[0], np.inf)
        for m, p in zip(means, precs):
            d = z - m
            best = np.minimum(best, ((d @ p) * d).sum(axis=1))
        return np.sqrt(np.maximum(best, 0.0))

    def _prep(self, x: np.ndarray) -> np.ndarray:
        a = np.asarray(x, dtype=np.float64)
        if a.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {a.shape}")
        if self.shift_ is not None and a.shape[1] != self.shift_.shape[0]:
            raise ValueError(
                f"embeddings have D={a.shape[1]}, the reference was fitted with D={self.shift_.shape[0]}"
            )
        if not np.isfinite(a).all():
            raise ValueError("embeddings contain NaN or inf")
        return a

    def fit(
        self, x: np.ndarray, y: np.ndarray | None = None, groups: np.ndarray | None = None
    ) -> MahalanobisOOD:
        """fit on reference embeddings ``(N, D)`` (and class labels ``(N,)`` for ``per_class``).

        ``groups`` ``(N,)`` (e.g. the slide or image of each tile) makes the cross-fitting hold out
        whole groups, so the thresholds reflect distances of *new* slides, not of new tiles of seen
        slides (neighbouring tiles are alike, which would make the thresholds too tight).
        """
        a = self._prep(x)
        n = a.shape[0]
        if n < 2 * self.cv_folds:
            raise ValueError(f"need at least {2 * self.cv_folds} reference embeddings, got {n}")
        if y is not None:
            y = np.asarray(y)
            if y.shape != (n,):
                raise ValueError(f"labels shape {y.shape} does not match embeddings {a.shape}")
        self.shift_ = a.mean(axis=0)
        sd = a.std(axis=0)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0) if self.standardize else np.ones_like(sd)
        z = (a - self.shift_) / self.scale_

        rng = np.random.default_rng(self.seed)
        if groups is None:
            folds = rng.permutation(n) % self.cv_folds
        else:
            groups = np.asarray(groups)
            if groups.shape != (n,):
                raise ValueError(f"groups shape {groups.shape} does not match embeddings {a.shape}")
            uniq, inv = np.unique(groups, return_inverse=True)
            if uniq.size < self.cv_folds:
                raise ValueError(f"need at least cv_folds={self.cv_folds} groups, got {uniq.size}")
            folds = (rng.permutation(uniq.size) % self.cv_folds)[inv]
        ref = np.empty(n)
        for f in range(self.cv_folds):
            tr, te = folds != f, folds == f
            m, p = self._fit_components(z[tr], None if y is None else y[tr])
            ref[te] = self._distances(z[te], m, p)
        self.means_, self.precisions_ = self._fit_components(z, y)
        self.ref_scores_ = ref
        self.thresholds = OODThresholds(
            float(np.quantile(ref, self.review_quantile)), float(np.quantile(ref, self.out_quantile))
        )
        return self

    # scoring ----------------------------------------------------------------------------------
    def score(self, x: np.ndarray) -> np.ndarray:
        """Mahalanobis distance to the (nearest class of the) reference, ``(N,)`` float64."""
        if self.means_ is None or self.precisions_ is None or self.shift_ is None or self.scale_ is None:
            raise RuntimeError("MahalanobisOOD is not fitted: call fit() or load() first")
        z = (self._prep(x) - self.shift_) / self.scale_
        return self._distances(z, self.means_, self.precisions_)

    def level(self, x: np.ndarray) -> np.ndarray:
        """0 in domain, 1 above the review threshold, 2 above the out-of-domain threshold; ``(N,)``."""
        s = self.score(x)
        t = self.thresholds
        assert t is not None
        return (s > t.review).astype(np.int8) + (s > t.out_of_domain).astype(np.int8)

    # persistence ------------------------------------------------------------------------------
    def to_bytes(self, *, backbone_id: str, weights_hash: str, tile_mpp: float | None = None,
                 provenance: dict | None = None) -> bytes:
        """the state as ``.npz`` bytes: arrays plus a JSON header with the backbone id and weights hash
        (write them with ``cellvit_optimus.engine.io.atomic_write_bytes``; :meth:`load` reads the file).

        ``tile_mpp`` (the resolution of the reference tiles) and ``provenance`` (what it was fitted on,
        JSON-serialisable) are recorded for the reader; neither changes scoring.
        """
        if self.means_ is None or self.thresholds is None:
            raise RuntimeError("MahalanobisOOD is not fitted: nothing to save")
        meta = {
            "kind": _KIND, "version": STATE_VERSION, "backbone_id": backbone_id,
            "weights_hash": weights_hash, "estimator": self.estimator, "per_class": self.per_class,
            "standardize": self.standardize, "review_quantile": self.review_quantile,
            "out_quantile": self.out_quantile, "cv_folds": self.cv_folds,
            "min_class_size": self.min_class_size, "seed": self.seed, "features": self.features,
            "tile_mpp": self.tile_mpp if tile_mpp is None else float(tile_mpp),
            "provenance": self.provenance if provenance is None else provenance,
            "thresholds": {"review": self.thresholds.review, "out_of_domain": self.thresholds.out_of_domain},
        }
        import io

        buf = io.BytesIO()
        np.savez_compressed(
            buf, meta=np.array(json.dumps(meta)), shift=self.shift_, scale=self.scale_,
            means=self.means_, precisions=self.precisions_, ref_scores=self.ref_scores_,
        )
        return buf.getvalue()

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, backbone_id: str | None = None, weights_hash: str | None = None
    ) -> MahalanobisOOD:
        """load a reference; refuses (StateMismatchError) one fitted for another backbone or weights."""
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read {_KIND} state ({exc})") from exc
        meta = json.loads(str(arrays["meta"]))
        check_header(meta, _KIND, path)
        check_ids(path, _KIND, meta, backbone_id=backbone_id, weights_hash=weights_hash)
        features = meta.get("features", EMBEDDING)  # states written before recipes were recorded
        if features not in RECIPES:
            raise StateMismatchError(f"{path}: {_KIND} state uses feature recipe {features!r}, which this "
                                     f"version does not build (known: {', '.join(RECIPES)})")
        o = cls(meta["estimator"], meta["per_class"], meta["standardize"], meta["review_quantile"],
                meta["out_quantile"], meta["cv_folds"], meta["min_class_size"], meta["seed"], features)
        o.backbone_id, o.weights_hash = meta["backbone_id"], meta["weights_hash"]
        o.tile_mpp = meta.get("tile_mpp")
        o.provenance = meta.get("provenance", {})
        o.shift_, o.scale_ = arrays["shift"], arrays["scale"]
        o.means_, o.precisions_ = arrays["means"], arrays["precisions"]
        o.ref_scores_ = arrays["ref_scores"]
        o.thresholds = OODThresholds(**meta["thresholds"])
        return o

    def with_thresholds(self, review: float, out_of_domain: float) -> MahalanobisOOD:
        """override the thresholds (e.g. from a site's threshold file); returns self."""
        if not review <= out_of_domain:
            raise ConfigError(f"review={review!r} must be <= out_of_domain={out_of_domain!r}")
        self.thresholds = OODThresholds(float(review), float(out_of_domain))
        return self
