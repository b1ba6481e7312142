"""NP and HV training targets from a ground-truth instance map (HoVer-Net's ``gen_targets``).

The inverse of :mod:`.hovernet`: the heads' training loops (``heads/``) turn annotated instance maps
(``engine.datasets``) into the nuclear-pixel target and the horizontal / vertical distance maps, and
the round-trip tests feed those targets back through :func:`~.hovernet.hv_to_instances`.

Definition (HoVer-Net, Graham et al. 2019, ``gen_instance_hv_map``): every 4-connected piece of an
instance is its own nucleus (HoVer-Net's ``fix_mirror_padding``); inside it, H is the column offset
from the piece's centre of mass (rounded, ``int(c + 0.5)``) and V the row offset, each scaled so that
the negative side spans [-1, 0) and the positive side (0, 1] separately; background is 0. Pieces
smaller than ``min_size`` pixels keep their NP pixels but get H = V = 0, as in HoVer-Net.
One deliberate difference: HoVer-Net's code measures offsets from a 1-based grid against a 0-based
centre of mass, which moves the zero crossing one pixel up and left; here offsets are taken from the
centre of mass itself.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _numba as nb

__all__ = ("instances_to_hv",)


@njit(cache=True, nogil=True)
def _piece_stats(pieces, n):
    h, w = pieces.shape
    area = np.zeros(n + 1, np.int64)
    sx = np.zeros(n + 1, np.float64)
    sy = np.zeros(n + 1, np.float64)
    for y in range(h):
        for x in range(w):
            v = pieces[y, x]
            if v > 0:
                area[v] += 1
                sx[v] += x
                sy[v] += y
    cx = np.zeros(n + 1, np.int64)
    cy = np.zeros(n + 1, np.int64)
    for i in range(1, n + 1):
        if area[i] > 0:
            cx[i] = int(sx[i] / area[i] + 0.5)
            cy[i] = int(sy[i] / area[i] + 0.5)
    # extreme offsets per piece
    xmin = np.zeros(n + 1, np.int64)
    xmax = np.zeros(n + 1, np.int64)
    ymin = np.zeros(n + 1, np.int64)
    ymax = np.zeros(n + 1, np.int64)
    for y in range(h):
        for x in range(w):
            v = pieces[y, x]
            if v > 0:
                dx = x - cx[v]
                dy = y - cy[v]
                if dx < xmin[v]:
                    xmin[v] = dx
                if dx > xmax[v]:
                    xmax[v] = dx
                if dy < ymin[v]:
                    ymin[v] = dy
                if dy > ymax[v]:
                    ymax[v] = dy
    return area, cx, cy, xmin, xmax, ymin, ymax


@njit(cache=True, nogil=True, parallel=True)
def _fill_hv(pieces, area, cx, cy, xmin, xmax, ymin, ymax, min_size, np_out, hv_out):
    h, w = pieces.shape
    for y in prange(h):
        for x in range(w):
            v = pieces[y, x]
            if v == 0:
                np_out[y, x] = 0.0
                hv_out[0, y, x] = 0.0
                hv_out[1, y, x] = 0.0
                continue
            np_out[y, x] = 1.0
            if area[v] < min_size:
                hv_out[0, y, x] = 0.0
                hv_out[1, y, x] = 0.0
                continue
            dx = x - cx[v]
            dy = y - cy[v]
            if dx < 0:
                hx = dx / -xmin[v]
            elif dx > 0:
                hx = dx / xmax[v]
            else:
                hx = 0.0
            if dy < 0:
                hy = dy / -ymin[v]
            elif dy > 0:
                hy = dy / ymax[v]
            else:
                hy = 0.0
            hv_out[0, y, x] = hx
            hv_out[1, y, x] = hy


def instances_to_hv(inst_map: np.ndarray, min_size: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """NP and HV targets of a ground-truth instance map.

    Parameters
    ----------
    inst_map : ndarray, (H, W) int
        0 background, positive instance ids (any order, need not be contiguous or connected).
    min_size : int
        Pieces smaller than this get no HV signal (HoVer-Net default 30); 0 keeps all.

    Returns
    -------
    np_target : ndarray, (H, W) float32
        1 on nuclear pixels, 0 elsewhere.
    hv : ndarray, (2, H, W) float32
        Channel 0 horizontal (along x), channel 1 vertical (along y), in [-1, 1].

    Raises
    ------
    ValueError
        ``inst_map`` is not 2-D or has negative ids.
    """
    inst = np.asarray(inst_map)
    if inst.ndim != 2:
        raise ValueError(f"inst_map must be 2-D (H, W), got shape {inst.shape}")
    if not np.issubdtype(inst.dtype, np.integer):
        raise TypeError(f"inst_map must be an integer array, got dtype {inst.dtype}")
    inst = np.ascontiguousarray(inst, dtype=np.int32)
    h, w = inst.shape
    np_t = np.empty((h, w), np.float32)
    hv = np.empty((2, h, w), np.float32)
    if inst.size == 0:
        return np_t, hv
    if inst.min() < 0:
        raise ValueError(f"inst_map has negative ids (min {int(inst.min())})")
    pieces = np.empty((h, w), np.int32)
    n = nb.label_equal(inst, pieces, np.empty(h * w, np.int64))
    area, cx, cy, xmin, xmax, ymin, ymax = _piece_stats(pieces, n)
    _fill_hv(pieces, area, cx, cy, xmin, xmax, ymin, ymax, int(min_size), np_t, hv)
    return np_t, hv
