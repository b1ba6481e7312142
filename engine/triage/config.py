"""The triage run's configuration: one frozen dataclass composed of the subsystem configs (tissue,
scheduler, safety), validated on construction. The CLI maps its flags onto it; the :class:`~.engine.Engine`
reads it."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field, replace
from typing import TYPE_CHECKING

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.pipeline import DECODERS, Decoder, SchedulerConfig
from cellvit_optimus.engine.settings import MIN_TISSUE_FRACTION, TRIAGE_OVERLAP_PX, TRIAGE_READ_CHUNK
from cellvit_optimus.engine.wsi import TissueConfig
from cellvit_optimus.safety.config import SafetyConfig

if TYPE_CHECKING:
    from cellvit_optimus.engine.wsi import BackendName

__all__ = ("TriageConfig", "OUTPUTS", "LEGACY_SAFETY_KEYWORDS")

OUTPUTS = ("features", "cells", "regions", "thumbnail", "summary")

#: the former flat keywords of :class:`TriageConfig` -> the :class:`~cellvit_optimus.safety.SafetyConfig`
#: field each one now sets (still accepted, so existing callers keep working)
LEGACY_SAFETY_KEYWORDS = {"thresholds": "thresholds_path", "ood_state": "ood_state_path",
                          "nucleus_conformal": "conformal_state_path", "shadow_slides": "shadow_slides",
                          "site_state": "site_state_path", "site_id": "site_id"}


@dataclass(frozen=True)
class TriageConfig:
    """everything a triage run needs besides the models

    The safety layer's options (threshold file, OOD and conformal states, shadow mode, site) live in
    ``safety``. The keywords ``thresholds``, ``ood_state``, ``nucleus_conformal``, ``shadow_slides``,
    ``site_state`` and ``site_id`` are still accepted and set the matching ``safety`` field
    (:data:`LEGACY_SAFETY_KEYWORDS`). They are init-only: read the values from ``config.safety``
    (``config.shadow_slides`` is the class default, None, as for any init-only field, which is what
    ``dataclasses.replace`` needs to keep ``safety`` as it is).
    """

    tissue: TissueConfig = field(default_factory=TissueConfig)
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(batch_tiles=TRIAGE_READ_CHUNK))
    mpp: float | None = None  # level-0 MPP override
    backend: BackendName = "auto"
    decoder: Decoder = "auto"  # tile read path (readpath.DECODERS): GPU JPEG decode when it measures faster
    nuclei_mpp: float | None = None  # default: the nuclei model's training resolution
    overlap_px: int = TRIAGE_OVERLAP_PX  # tile overlap at the nuclei resolution
    min_tissue_fraction: float = MIN_TISSUE_FRACTION
    outputs: tuple[str, ...] = OUTPUTS
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    lock_timeout_s: float | None = None  # a second run on a locked output folder waits this long (None: until free)
    gzip_cells: bool = False  # write cells.geojson.gz (deterministic gzip) instead of cells.geojson
    # the former flat safety keywords (init-only, mapped onto ``safety`` in __post_init__)
    thresholds: InitVar[str | None] = None
    ood_state: InitVar[str | None] = None
    nucleus_conformal: InitVar[str | None] = None
    shadow_slides: InitVar[int | None] = None
    site_state: InitVar[str | None] = None
    site_id: InitVar[str | None] = None

    def __post_init__(self, thresholds: str | None, ood_state: str | None, nucleus_conformal: str | None,
                      shadow_slides: int | None, site_state: str | None, site_id: str | None) -> None:
        given = {LEGACY_SAFETY_KEYWORDS[k]: v for k, v in
                 (("thresholds", thresholds), ("ood_state", ood_state), ("nucleus_conformal", nucleus_conformal),
                  ("shadow_slides", shadow_slides), ("site_state", site_state), ("site_id", site_id))
                 if v is not None}
        if given:  # SafetyConfig validates them (shadow_slides >= 0, a non-empty site id)
            object.__setattr__(self, "safety", replace(self.safety, **given))
        unknown = set(self.outputs) - set(OUTPUTS)
        if unknown:
            raise ConfigError(f"outputs={sorted(unknown)} unknown; choose from {', '.join(OUTPUTS)}")
        if "summary" not in self.outputs:
            raise ConfigError("outputs must include 'summary' (it marks a finished slide)")
        if self.overlap_px < 0:
            raise ConfigError(f"overlap_px={self.overlap_px} must be >= 0")
        if self.lock_timeout_s is not None and not self.lock_timeout_s >= 0:
            raise ConfigError(f"lock_timeout_s={self.lock_timeout_s} must be >= 0 (or None: wait until free)")
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder={self.decoder!r} is not one of {', '.join(DECODERS)}")

