"""The safety layer's configuration: one frozen dataclass, validated on construction.

It holds how the safety states are fitted (conformal score and alpha, OOD estimator and quantiles,
calibration bins) and where the thresholds and the site state live; the thresholds themselves are
data (:class:`~.tags.TagThresholds`, loaded from a file), not code constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cellvit_optimus.engine.errors import ConfigError

from .conformal import SplitConformal
from .ood import MahalanobisOOD
from .ood_features import EMBEDDING_TILE_STATS, RECIPES

__all__ = ("SafetyConfig",)


@dataclass(frozen=True)
class SafetyConfig:
    """options of the safety layer (composed into the engine config: ``TriageConfig.safety``)."""

    alpha: float = 0.1
    conformal_score: Literal["aps", "raps"] = "raps"
    randomized: bool = True
    raps_lambda: float = 0.1
    raps_k_reg: int = 1
    class_conditional: bool = False
    ood_estimator: Literal["ledoit_wolf", "oas"] = "ledoit_wolf"
    ood_per_class: bool = False
    ood_review_quantile: float = 0.95
    ood_out_quantile: float = 0.995
    ood_features: str = EMBEDDING_TILE_STATS
    ece_bins: int = 15
    thresholds_path: str | None = None  # TagThresholds JSON; None: the conservative built-in defaults
    ood_state_path: str | None = None  # MahalanobisOOD state (.npz) fitted for the run's backbone
    conformal_state_path: str | None = None  # SplitConformal state (.json) of the nuclei model's types
    site_state_path: str | None = None  # shadow-mode counter file; None: the run's default place
    site_id: str = "default"
    shadow_slides: int = 30  # cold start: the first N slides of a site are never cleared

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha={self.alpha!r} must lie in (0, 1)")
        if self.conformal_score not in ("aps", "raps"):
            raise ConfigError(f"conformal_score={self.conformal_score!r} is not one of 'aps', 'raps'")
        if not self.raps_lambda >= 0:
            raise ConfigError(f"raps_lambda={self.raps_lambda!r} must be >= 0")
        if not (isinstance(self.raps_k_reg, int) and self.raps_k_reg >= 0):
            raise ConfigError(f"raps_k_reg={self.raps_k_reg!r} must be an int >= 0")
        if self.ood_estimator not in ("ledoit_wolf", "oas"):
            raise ConfigError(f"ood_estimator={self.ood_estimator!r} is not one of 'ledoit_wolf', 'oas'")
        if not 0.0 < self.ood_review_quantile <= self.ood_out_quantile < 1.0:
            raise ConfigError(
                f"ood_review_quantile={self.ood_review_quantile!r}, ood_out_quantile="
                f"{self.ood_out_quantile!r} must satisfy 0 < review <= out < 1"
            )
        if self.ood_features not in RECIPES:
            raise ConfigError(f"ood_features={self.ood_features!r} is not one of {', '.join(map(repr, RECIPES))}")
        if not (isinstance(self.ece_bins, int) and self.ece_bins >= 1):
            raise ConfigError(f"ece_bins={self.ece_bins!r} must be an int >= 1")
        if not (isinstance(self.shadow_slides, int) and not isinstance(self.shadow_slides, bool)
                and self.shadow_slides >= 0):
            raise ConfigError(f"shadow_slides={self.shadow_slides!r} must be an int >= 0")
        if not self.site_id:
            raise ConfigError("site_id must be a non-empty string")

    def make_conformal(self) -> SplitConformal:
        return SplitConformal(alpha=self.alpha, score=self.conformal_score, randomized=self.randomized,
                              lam=self.raps_lambda, k_reg=self.raps_k_reg,
                              class_conditional=self.class_conditional)

    def make_ood(self) -> MahalanobisOOD:
        return MahalanobisOOD(estimator=self.ood_estimator, per_class=self.ood_per_class,
                              review_quantile=self.ood_review_quantile, out_quantile=self.ood_out_quantile,
                              features=self.ood_features)
