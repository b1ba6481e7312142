"""Orchestration: slide readers, tissue detection and tiling, the tile scheduler, the backbone runner,
outputs and the CLI. The only package that imports the others; importing it stays cheap (torch,
cuCIM and numba load only when a feature that needs them is used)."""

from __future__ import annotations

from .errors import (
    BackendUnavailableError,
    ConfigError,
    CorruptSlideError,
    NoMPPError,
    NoTissueError,
    NotASlideError,
    OptimusError,
    OutOfDomainError,
    SlideError,
    SlideNotFoundError,
    StateMismatchError,
    UnsupportedFormatError,
    WeightsError,
)

__version__ = "0.1.0"

#: public name -> submodule defining it; loaded on first access so this import stays cheap
_LAZY = {
    "open_slide": ".slide",
    "Slide": ".slide",
    "TilingConfig": ".tissue",
    "TissueConfig": ".tissue",
    "detect_tissue": ".tissue",
    "tile_grid": ".tissue",
    "inspect_slide": ".inspect",
    "Failure": ".inspect",
    "SchedulerConfig": ".scheduler",
    "ExtractConfig": ".extract",
    "extract_features": ".extract",
    "aextract_features": ".extract",
    "read_features": ".features",
    "BackboneRunner": ".runner",
    "Engine": ".triage",
    "TriageConfig": ".triage",
    "SlideResult": ".triage",
    "BatchResult": ".triage",
    "CellTable": ".cells",
}

__all__ = (
    "__version__",
    *_LAZY,
    "OptimusError",
    "ConfigError",
    "BackendUnavailableError",
    "SlideError",
    "SlideNotFoundError",
    "NotASlideError",
    "CorruptSlideError",
    "UnsupportedFormatError",
    "NoMPPError",
    "NoTissueError",
    "WeightsError",
    "StateMismatchError",
    "OutOfDomainError",
)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
