"""The one exception hierarchy of cellvit-optimus.

Every error the package raises on purpose derives from :class:`OptimusError`. Leaf packages
(kernels, heads, safety) import their error types from here and nothing else from ``engine``.
Messages name the file (where there is one), the offending value and the reason, so that a batch
failure record is useful on its own.
"""

from __future__ import annotations

import errno
from os import PathLike

__all__ = (
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
    "CorruptTilesError",
    "SlideTooLargeError",
    "OutputWriteError",
    "OutputLockedError",
    "WeightsError",
    "StateMismatchError",
    "OutOfDomainError",
)


class OptimusError(Exception):
    """Base class of every error raised on purpose by cellvit-optimus."""

    #: short machine-readable reason, used in failure records and worklists
    reason: str = "error"


class ConfigError(OptimusError, ValueError):
    """A configuration value is invalid (names the field, the value and what is allowed)."""

    reason = "invalid configuration"


class BackendUnavailableError(OptimusError, ImportError):
    """An optional backend or package needed for the requested feature is not installed or not usable."""

    reason = "backend unavailable"


class SlideError(OptimusError):
    """A slide could not be used; ``path`` names the file and ``reason`` says why."""

    reason = "slide error"

    def __init__(self, path: str | PathLike[str], detail: str | None = None) -> None:
        self.path = str(path)
        self.detail = detail
        msg = f"{self.path}: {self.reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)

    def __reduce__(self):  # keep picklable across threads/processes (ray, multiprocessing)
        return (type(self), (self.path, self.detail))


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide path does not exist."""

    reason = "not found"


class NotASlideError(SlideError):
    """The file exists but is not an image/slide any backend recognises (e.g. a text file renamed .svs)."""

    reason = "not a slide"


class CorruptSlideError(SlideError):
    """The file looks like a slide but is truncated or its tiles cannot be decoded."""

    reason = "truncated or corrupt"


class UnsupportedFormatError(SlideError):
    """The file is an image of a kind no installed backend can read as a slide."""

    reason = "unsupported format"


class NoMPPError(SlideError):
    """The slide carries no microns-per-pixel metadata and no override was given."""

    reason = "no MPP"


class NoTissueError(SlideError):
    """Tissue detection found no tile passing the tissue threshold."""

    reason = "no tissue"


class CorruptTilesError(CorruptSlideError):
    """Too many of the slide's tiles fail to decode cleanly (the detail gives the count and positions)."""

    reason = "corrupt tiles"


class SlideTooLargeError(SlideError):
    """Reading the slide (a thumbnail of a huge single-level image) would exceed the memory budget."""

    reason = "too large for the memory budget"


class OutputWriteError(OptimusError, OSError):
    """Writing an output failed at the operating system (disk full, quota, read-only, I/O error)."""

    reason = "write failed"

    def __init__(self, path: str | PathLike[str], detail: str, reason: str | None = None) -> None:
        self.path = str(path)
        self.detail = detail
        if reason is not None:
            self.reason = reason
        super().__init__(f"{self.path}: {self.reason} ({detail})")

    def __reduce__(self):
        return (type(self), (self.path, self.detail, self.reason))

    @classmethod
    def from_os_error(cls, path: str | PathLike[str], exc: OSError) -> OutputWriteError:
        # HDF5 reports a full disk inside its message ("errno = 28, ... No space left on device")
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) or "errno = 28" in str(exc)
        where = f" writing {exc.filename}" if exc.filename and str(exc.filename) != str(path) else ""
        return cls(path, f"{exc.strerror or exc}{where}", "disk full" if full else None)


class OutputLockedError(OptimusError):
    """Another run holds the output folder's lock (names the folder and the holder)."""

    reason = "output folder locked"

    def __init__(self, path: str | PathLike[str], detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{self.path}: {self.reason} ({detail})")

    def __reduce__(self):
        return (type(self), (self.path, self.detail))


class WeightsError(OptimusError):
    """Model weights are missing, unreadable or do not match the expected architecture."""

    reason = "wrong weights"


class StateMismatchError(OptimusError, ValueError):
    """A saved state (calibration, OOD reference, cache) belongs to another model or backbone."""

    reason = "state mismatch"


class OutOfDomainError(OptimusError):
    """An input is outside the domain the model was validated on (raised only where asked for)."""

    reason = "out of domain"
