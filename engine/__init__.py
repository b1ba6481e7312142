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

__all__ = (
    "__version__",
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
