"""The triage product: the :class:`Engine` (set-up, run and stream), the per-slide outputs, the
worklist, and the Ray scale-out.

``from cellvit_optimus.engine.triage import Engine, TriageConfig`` is the library entry point; the
names below are the wing's public API, which other wings import from here, never from its modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellvit_optimus.engine.lazy import exports

if TYPE_CHECKING:
    from cellvit_optimus.engine.triage.cells import CellTable
    from cellvit_optimus.engine.triage.config import OUTPUTS, TriageConfig
    from cellvit_optimus.engine.triage.distributed import ClusterConfig, ClusterProgress, RayTriage
    from cellvit_optimus.engine.triage.engine import Engine
    from cellvit_optimus.engine.triage.finalise import fallback_priority
    from cellvit_optimus.engine.triage.results import BatchResult, SlideResult

_EXPORTS = {
    "CellTable": ".cells", "OUTPUTS": ".config", "TriageConfig": ".config", "ClusterConfig": ".distributed",
    "ClusterProgress": ".distributed", "RayTriage": ".distributed", "Engine": ".engine",
    "fallback_priority": ".finalise", "BatchResult": ".results", "SlideResult": ".results",
}

__all__ = ("Engine", "TriageConfig", "SlideResult", "BatchResult", "CellTable", "OUTPUTS", "ClusterConfig",
           "ClusterProgress", "RayTriage", "fallback_priority")

__getattr__, __dir__ = exports(__name__, _EXPORTS)
