"""The triage product: the :class:`Engine` (set-up, run and stream), the per-slide outputs, the
worklist, and the Ray scale-out.

``from cellvit_optimus.engine.triage import Engine, TriageConfig`` is the library entry point."""

from __future__ import annotations

from cellvit_optimus.engine.triage.engine import BatchResult, Engine, SlideResult, TriageConfig

__all__ = ("Engine", "TriageConfig", "SlideResult", "BatchResult")
