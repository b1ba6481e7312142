"""Outlines at a finer resolution than the grid they were traced on (numpy only).

A nucleus traced on the model's grid (0.5 um/px) and drawn on a 40x slide (0.25 um/px) is a staircase of
2-pixel steps. :func:`smooth_ring` cuts the corners of such a pixel-edge ring (Chaikin's scheme) before
it is scaled up, so the outline follows the nucleus instead of the model's grid; the ring stays closed
and simple (corner cutting of a simple polygon never makes it cross itself) and its area changes by
well under one model pixel per vertex.
"""

from __future__ import annotations

import numpy as np

__all__ = ("smooth_ring",)


def smooth_ring(ring: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Chaikin corner cutting of a closed ring.

    Parameters
    ----------
    ring : ndarray, (K, 2) float
        Vertices of a closed polygon (the first vertex is not repeated at the end; a repeated one is
        dropped).
    iterations : int
        Rounds of cutting; each doubles the vertex count and replaces every vertex by the points at 1/4
        and 3/4 of its two edges.

    Returns
    -------
    ndarray, (K * 2**iterations, 2) float64
        The smoothed ring (unchanged for fewer than 3 vertices or ``iterations`` 0).
    """
    r = np.asarray(ring, np.float64)
    if r.ndim != 2 or r.shape[1] != 2:
        raise ValueError(f"smooth_ring: expected a (K, 2) ring, got shape {r.shape}")
    if iterations < 0:
        raise ValueError(f"smooth_ring: iterations={iterations} must be >= 0")
    if len(r) > 1 and np.array_equal(r[0], r[-1]):
        r = r[:-1]
    if len(r) < 3:
        return r
    for _ in range(iterations):
        nxt = np.roll(r, -1, axis=0)
        out = np.empty((2 * len(r), 2))
        out[0::2] = 0.75 * r + 0.25 * nxt
        out[1::2] = 0.25 * r + 0.75 * nxt
        r = out
    return r
