"""Calibrated uncertainty, conformal prediction sets, out-of-domain detection and trust tags."""

from __future__ import annotations

from .calibration import CalibrationReport, TemperatureScaler, calibration_errors, reliability_diagram
from .config import SafetyConfig
from .conformal import SplitConformal, conformal_quantile, type_probabilities
from .ood import MahalanobisOOD, OODThresholds
from .ood_features import ood_features, tile_statistics
from .tags import (
    ShadowMode,
    SlideTags,
    Tag,
    TagDecision,
    TagThresholds,
    TileSignals,
    shadow_prefix,
    tag_all,
    tag_regions,
    tag_slide,
    tag_tiles,
)
from .uncertainty import (
    TileUncertainty,
    aggregate_by_region,
    entropy_map,
    hv_consistency_map,
    label_regions,
    tile_uncertainty,
)

__all__ = (
    "SafetyConfig",
    # uncertainty
    "TileUncertainty",
    "entropy_map",
    "hv_consistency_map",
    "tile_uncertainty",
    "label_regions",
    "aggregate_by_region",
    # calibration
    "TemperatureScaler",
    "CalibrationReport",
    "calibration_errors",
    "reliability_diagram",
    # conformal
    "SplitConformal",
    "conformal_quantile",
    "type_probabilities",
    # out-of-domain
    "MahalanobisOOD",
    "OODThresholds",
    "tile_statistics",
    "ood_features",
    # tags
    "Tag",
    "TagDecision",
    "TagThresholds",
    "TileSignals",
    "SlideTags",
    "tag_tiles",
    "tag_regions",
    "tag_slide",
    "tag_all",
    "ShadowMode",
    "shadow_prefix",
)
