"""The triage run's configuration: one frozen dataclass composed of the subsystem configs (tissue,
scheduler, safety), validated on construction. The CLI maps its flags onto it; the :class:`~.engine.Engine`
reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.pipeline import DECODERS, Decoder, SchedulerConfig
from cellvit_optimus.engine.settings import MIN_TISSUE_FRACTION, TRIAGE_OVERLAP_PX, TRIAGE_READ_CHUNK
from cellvit_optimus.engine.wsi import TissueConfig
from cellvit_optimus.safety.config import SafetyConfig

if TYPE_CHECKING:
    from cellvit_optimus.engine.wsi import BackendName

__all__ = ("TriageConfig", "OUTPUTS")

OUTPUTS = ("features", "cells", "regions", "thumbnail", "summary")


@dataclass(frozen=True)
class TriageConfig:
    """everything a triage run needs besides the models

    The safety layer's options (threshold file, OOD and conformal states, shadow mode, site) live in
    ``safety`` (:class:`~cellvit_optimus.safety.SafetyConfig`), e.g.
    ``TriageConfig(safety=SafetyConfig(shadow_slides=0))``.
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

    def __post_init__(self) -> None:
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

