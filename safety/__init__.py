"""Calibrated uncertainty, conformal prediction sets, out-of-domain detection and trust tags."""

from __future__ import annotations

from .calibration import CalibrationReport, TemperatureScaler, calibration_errors, reliability_diagram
from .config import SafetyConfig
from .conformal import SplitConformal, conformal_quantile
from .ood import MahalanobisOOD, OODThresholds
from .tags import (
    ShadowMode,
    SlideTags,
    Tag,
    TagDecision,
    TagThresholds,
    TileSignals,
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
    # out-of-domain
    "MahalanobisOOD",
    "OODThresholds",
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
)
