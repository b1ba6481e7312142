"""numpy + Numba kernels: HV instance post-processing, training targets, stitching and metrics (no torch)."""

from __future__ import annotations

__all__: tuple[str, ...] = ()
