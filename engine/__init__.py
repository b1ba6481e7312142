"""Orchestration: slide readers, tissue detection and tiling, the tile scheduler, the backbone runner,
outputs and the CLI. The only package that imports the others; importing it stays cheap (torch,
cuCIM and numba load only when a feature that needs them is used)."""

from __future__ import annotations

import os as _os

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

# cuCIM's cuFile writes ./cufile.log (ERROR lines about a missing GPU driver) into whatever folder the
# process runs from; send it nowhere unless the user chose a file. Set before cuCIM can be imported.
_os.environ.setdefault("CUFILE_LOGFILE_PATH", _os.devnull)

#: public name -> submodule defining it; loaded on first access so this import stays cheap
_LAZY = {
    "open_slide": ".wsi.slide",
    "Slide": ".wsi.slide",
    "TilingConfig": ".wsi.tissue",
    "TissueConfig": ".wsi.tissue",
    "detect_tissue": ".wsi.tissue",
    "tile_grid": ".wsi.tissue",
    "inspect_slide": ".wsi.inspect",
    "Failure": ".wsi.inspect",
    "SchedulerConfig": ".pipeline.scheduler",
    "ExtractConfig": ".pipeline.extract",
    "extract_features": ".pipeline.extract",
    "aextract_features": ".pipeline.extract",
    "read_features": ".pipeline.features",
    "BackboneRunner": ".pipeline.runner",
    "Engine": ".triage.engine",
    "TriageConfig": ".triage.engine",
    "SlideResult": ".triage.engine",
    "BatchResult": ".triage.engine",
    "CellTable": ".triage.cells",
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
