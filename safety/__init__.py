"""Calibrated uncertainty, conformal prediction sets, out-of-domain detection and trust tags."""

from __future__ import annotations

__all__: tuple[str, ...] = ()
