"""Numba kernels of the HV post-processing pipeline, one tile per call.

Called by :mod:`.hovernet`, which validates, allocates and runs batches on several threads. One tile
is one call (:func:`hv_tile`), map and instance table together, so nothing between the stages crosses
into Python. The stages:

1. foreground ``np_prob >= thr`` as a 0/1 byte mask; its row runs found 8 pixels at a time (uint64
   words, transitions by count-trailing-zeros); 4-connected components by union-find on the runs (a
   1024 px tile has ~10^4 runs against 10^6 pixels); the runs of components smaller than
   ``min_object_size`` are cleared from the mask;
2. Sobel of H along x and V along y, separable and streamed: the row pass (21 taps folded on the
   kernel's (anti)symmetry and unrolled) fills a ring of rows, the column pass reads it in groups of
   ``_GROUP`` output rows and blocks of ``_COLBLOCK`` columns, so the rows it reads stay in L1;
3. energy, marker seeds and the 3x3-blurred relief in the same row stream (the blur's horizontal
   [1, 2, 1] sums made once per row). Without a tile-wide range to measure only the pixels within one
   pixel of the foreground are ever read, so the passes skip the blocks of ``_SKIPBLOCK`` columns far
   from it. ``hovernet`` mode measuring its Sobel range keeps the foreground pixels' Sobel values and
   runs the energy in a second stream, once the tile-wide min / max are known;
4. marker seeds: holes filled on runs (the background runs between seed runs, union-found; those not
   connected to the border are holes), opened with the 5x5 ellipse (``hovernet`` mode only) as
   erosions / dilations by a 5x3 box and a 1x5 column, labelled on runs with the small ones dropped;
5. marker-controlled watershed, one priority flood per foreground component that holds two or more
   markers: components cannot exchange pixels, and a flood's pop order restricted to one component is
   the global flood's (keys are (relief, insertion order) and insertions within a component happen in
   the same relative order), so flooding them separately gives the global result exactly. The queue
   is a bucket queue over the component's relief range whose current bucket is an exact binary heap
   (:func:`_flood`): the same pop order as one heap, from small heaps;
6. instance table: area, pixel sums, bounding box and first pixel from the component runs (pixels
   read only inside flooded components), outer contours traced once each into a growing buffer.

Modes (``mode``): 0 ``hovernet`` (Graham et al. 2019: tile-wide min-max normalised Sobel energy,
markers ``energy < marker_thr``, 5x5 opening, relief ``-blur((1 - energy) * fg)``); 1 ``optimus``
(markers where both Sobel slopes exceed ``marker_slope`` in HV units per pixel, no opening, relief
``blur(max(-sobel_h, -sobel_v))``: no tile-wide normalisation, so a tile's result does not depend on
the rest of the tile).

Conventions that the speed rests on (each measured; see bench/README.md):

* byte masks are (H, Wp) uint8 with ``Wp`` a multiple of 8 and the padding columns zero (never
  written), so that rows can be read as little-endian uint64 words;
* hot loops index 2-D arrays with uint64 row / column numbers rather than taking row views: a view
  costs two atomic reference-count updates, and signed runtime offsets make Numba emit negative-index
  wraparound code that stops LLVM from vectorising;
* the per-row work calls leaf kernels straight from the stage function: a helper that passes arrays
  on to further calls gets reference-count updates around every inner call; for the same reason the
  heap and per-run updates are written out in their loops rather than put in helpers;
* scratch buffers live in a per-thread workspace (:func:`hv_workspace`), the float rows of the Sobel
  passes aligned to 64 bytes.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np
from numba import njit

from ._numba import cttz64, uf_find, reflect101, sortable_bits, trace_all

if sys.byteorder != "little":  # the uint64 word reads of the byte masks assume it
    raise ImportError("cellvit_optimus.kernels needs a little-endian machine")

MODE_HOVERNET = 0
MODE_OPTIMUS = 1

# bucket count of a flood's queue: about a quarter of the component's area (a few entries per bucket
# at the front), capped so that resetting the buckets stays negligible
_NB_MAX = 4096
# Sobel column pass: output rows per group and columns per block (a group's 2r + G ring rows of one
# block, 28 x 1 KiB for r = 10, stay in L1 while the group's rows are made)
_GROUP = 8
_COLBLOCK = 256
# columns: the unit in which the Sobel passes skip the parts of rows far from the foreground
_SKIPBLOCK = 32

# ---------------------------------------------------------------------------- run-length components


@njit(cache=True, nogil=True)
def _threshold(p, thr, mask):
    """``mask[y, x] = p[y, x] >= thr`` (0/1) for x < W (padding columns untouched)."""
    h, w = p.shape
    for y in range(h):
        pr = p[y]
        mr = mask[y]
        for x in range(w):
            mr[x] = pr[x] >= thr


@njit(cache=True, nogil=True)
def _scan_runs(mask, rs, re, ry, rowstart):
    """Runs of 1s of a 0/1 byte mask (H, Wp) per row: ``rs``/``re`` start / end (exclusive) x, ``ry``
    row; returns the count.

    Read 8 pixels (a little-endian uint64 word) at a time: the word's transitions are
    ``m ^ (m << 8 | previous >> 56)`` (byte i compared with byte i - 1), visited lowest first by
    count-trailing-zeros. Words without a transition, nearly all of them, cost a few instructions;
    the zero padding closes a run that reaches the last column."""
    h, wp = mask.shape
    n = 0
    par = 0
    s8 = np.uint64(8)
    s56 = np.uint64(56)
    one = np.uint64(1)
    nw = wp >> 3
    wd = mask.reshape(mask.size).view(np.uint64)  # one view per call, not per row
    for y in range(h):
        rowstart[y] = n
        prev = np.uint64(0)
        for k in range(y * nw, (y + 1) * nw):
            cur = wd[k]
            t = cur ^ ((cur << s8) | (prev >> s56))
            prev = cur
            while t != 0:
                x = 8 * (k - y * nw) + (cttz64(t) >> 3)
                if par == 0:
                    rs[n] = x
                else:
                    re[n] = x
                    ry[n] = y
                    n += 1
                par ^= 1
                t &= t - one
    rowstart[h] = n
    return n


@njit(cache=True, nogil=True)
def _union_runs(rs, re, rowstart, h, parent):
    """Union-find over runs of consecutive rows sharing a column (4-connectivity); roots are the
    smallest run index of their set, i.e. the run holding the set's first pixel in raster order."""
    n = rowstart[h]
    for i in range(n):
        parent[i] = i
    for y in range(1, h):
        a = rowstart[y - 1]
        ae = rowstart[y]
        b = ae
        be = rowstart[y + 1]
        while a < ae and b < be:
            if rs[a] < re[b] and rs[b] < re[a]:
                ra = uf_find(parent, a)
                rb = uf_find(parent, b)
                if ra < rb:
                    parent[rb] = ra
                elif rb < ra:
                    parent[ra] = rb
            if re[a] <= re[b]:
                a += 1
            else:
                b += 1
    return n


@njit(cache=True, nogil=True)
def _number_runs(rs, re, n, parent, min_size, runlab):
    """Final label of each run: sets of >= ``min_size`` pixels numbered 1..m in raster order of their
    first pixel (as ``scipy.ndimage.label`` + skimage ``remove_small_objects``), others 0; returns m."""
    size = np.zeros(n, np.int64)
    for i in range(n):
        r = uf_find(parent, i)
        parent[i] = r
        size[r] += re[i] - rs[i]
    m = 0
    for i in range(n):
        r = parent[i]
        if r == i:
            if size[i] >= min_size:
                m += 1
                runlab[i] = m
            else:
                runlab[i] = 0
        else:
            runlab[i] = runlab[r]
    return m


@njit(cache=True, nogil=True)
def _paint_lut(rs, re, ry, n, runlab, lut, out):
    """``out = 0``, then ``out[run] = lut[runlab[run]]`` (every pixel written)."""
    out[:] = 0
    for i in range(n):
        v = lut[runlab[i]]
        if v != 0:
            y = ry[i]
            for x in range(rs[i], re[i]):
                out[y, x] = v


@njit(cache=True, nogil=True)
def _set_runs(rs, re, ry, n, runlab, labelled, out, value, off):
    """``out[off + y, off + x] = value`` on the runs whose label is non-zero (``labelled``) or zero
    (not)."""
    for i in range(n):
        if (runlab[i] != 0) == labelled:
            y = ry[i] + off
            for x in range(rs[i] + off, re[i] + off):
                out[y, x] = value


@njit(cache=True, nogil=True)
def _paint_labels(rs, re, ry, n, runlab, out, off):
    """``out[off + y, off + x] = runlab[run]`` for the labelled runs (other pixels untouched)."""
    for i in range(n):
        v = runlab[i]
        if v != 0:
            y = ry[i] + off
            for x in range(rs[i] + off, re[i] + off):
                out[y, x] = v


# ------------------------------------------------------------------------------------ morphology


@njit(cache=True, nogil=True)
def _gaps(rs, re, rowstart, h, w, gs, ge, gy, grow):
    """The background runs of each row: the gaps before, between and after the runs ``rs``/``re``."""
    n = 0
    for y in range(h):
        grow[y] = n
        pos = 0
        for i in range(rowstart[y], rowstart[y + 1]):
            if rs[i] > pos:
                gs[n] = pos
                ge[n] = rs[i]
                gy[n] = y
                n += 1
            pos = re[i]
        if pos < w:
            gs[n] = pos
            ge[n] = w
            gy[n] = y
            n += 1
    grow[h] = n
    return n


@njit(cache=True, nogil=True)
def _fill_holes_runs(ss, se, srow, h, w, gs, ge, gy, grow, parent, hole, fs, fe, fy, frow):
    """Holes of the 0/1 set given by its runs ``ss``/``se`` (scipy ``binary_fill_holes``): background
    runs whose 4-connected set touches no image border. ``hole[g]`` (0/1) flags each background run
    ``g``; ``fs``/``fe``/``fy``/``frow`` receive the runs of the filled set (a seed run merged with the
    holes and seed runs that follow it on its row). Returns (background runs, filled runs)."""
    ng = _gaps(ss, se, srow, h, w, gs, ge, gy, grow)
    _union_runs(gs, ge, grow, h, parent)
    border = np.zeros(ng, np.uint8)
    for g in range(ng):
        if gy[g] == 0 or gy[g] == h - 1 or gs[g] == 0 or ge[g] == w:
            border[uf_find(parent, g)] = 1
    for g in range(ng):
        hole[g] = 1 - border[uf_find(parent, g)]
    nf = 0
    for y in range(h):
        frow[y] = nf
        a = srow[y]
        b = srow[y + 1]
        if a == b:
            continue
        # the gap between seed runs i and i + 1 of this row
        g = grow[y] + (1 if ss[a] > 0 else 0)
        s0 = ss[a]
        e0 = se[a]
        for i in range(a + 1, b):
            if hole[g] == 0:
                fs[nf] = s0
                fe[nf] = e0
                fy[nf] = y
                nf += 1
                s0 = ss[i]
            e0 = se[i]
            g += 1
        fs[nf] = s0
        fe[nf] = e0
        fy[nf] = y
        nf += 1
    frow[h] = nf
    return ng, nf


@njit(cache=True, nogil=True)
def _hpass5(src, w, out, is_and):
    """``out[y, x]`` = AND (erosion, outside = 1) or OR (dilation, outside = 0) of ``src[y, x-2..x+2]``."""
    h = src.shape[0]
    two = _u(2)
    one = _u(1)
    for y in range(_u(h)):
        if is_and:
            for x in range(two, _u(max(w - 2, 2))):
                out[y, x] = src[y, x - two] & src[y, x - one] & src[y, x] & src[y, x + one] & src[y, x + two]
        else:
            for x in range(two, _u(max(w - 2, 2))):
                out[y, x] = src[y, x - two] | src[y, x - one] | src[y, x] | src[y, x + one] | src[y, x + two]
        for e in range(4):  # the two columns at each end (all of a row narrower than 4)
            x = e if e < 2 else w - 4 + e
            if x < 0 or x >= w or (e >= 2 and x < 2):
                continue
            v = np.uint8(1) if is_and else np.uint8(0)
            for xx in range(max(x - 2, 0), min(x + 3, w)):
                v = (v & src[y, _u(xx)]) if is_and else (v | src[y, _u(xx)])
            out[y, _u(x)] = v


@njit(cache=True, nogil=True)
def _vpass(r5, src, w, out, is_and):
    """``out[y] = r5[y-1] op r5[y] op r5[y+1] op src[y-2] op src[y+2]`` (op AND with rows outside = 1,
    OR with rows outside = 0): with :func:`_hpass5`, the 5x5 ellipse = 5x3 box | 1x5 column."""
    h = r5.shape[0]
    for y in range(2, h - 2):
        yu = _u(y)
        a = _u(y - 1)
        c = _u(y + 1)
        d = _u(y - 2)
        e = _u(y + 2)
        if is_and:
            for x in range(_u(w)):
                out[yu, x] = r5[a, x] & r5[yu, x] & r5[c, x] & src[d, x] & src[e, x]
        else:
            for x in range(_u(w)):
                out[yu, x] = r5[a, x] | r5[yu, x] | r5[c, x] | src[d, x] | src[e, x]
    for k in range(4):  # the two rows at each end (all rows of a tile lower than 4)
        y = k if k < 2 else h - 4 + k
        if y < 0 or y >= h or (k >= 2 and y < 2):
            continue
        yu = _u(y)
        for x in range(_u(w)):
            v = r5[yu, x]
            for dy in (-1, 1):
                if 0 <= y + dy < h:
                    v = (v & r5[_u(y + dy), x]) if is_and else (v | r5[_u(y + dy), x])
            for dy in (-2, 2):
                if 0 <= y + dy < h:
                    v = (v & src[_u(y + dy), x]) if is_and else (v | src[_u(y + dy), x])
            out[yu, x] = v


@njit(cache=True, nogil=True)
def _open_ellipse5(m, w, r5, er, out):
    """Binary opening of a 0/1 uint8 mask (columns < ``w``) with OpenCV's 5x5 ellipse (rows +-2:
    centre column; rows -1..1: 5 wide), erosion treating the outside as 1 and dilation as 0 (OpenCV
    defaults).

    The ellipse is the union of a 5x3 box and a 1x5 column, so erosion = AND of the two erosions and
    dilation = OR of the two dilations: a horizontal 5-pass and a vertical pass each, byte-wise and
    vectorised. ``r5``, ``er`` scratch; ``out`` may be ``m`` (the last pass reads only the scratch).
    """
    _hpass5(m, w, r5, True)
    _vpass(r5, m, w, er, True)
    _hpass5(er, w, r5, False)
    _vpass(r5, er, w, out, False)


# ------------------------------------------------------------------------------ Sobel and energy
#
# The per-row kernels below index 2-D arrays with uint64 row / column numbers instead of taking row
# views: a view costs two atomic reference-count updates, which at ~50 views per row were a tenth of
# a 256 px tile's time, and signed runtime offsets make Numba emit negative-index wraparound code
# that stops LLVM from vectorising the loops. ``_u`` converts; every index expression stays uint64.

_u = np.uint64


@njit(cache=True, nogil=True, fastmath=True)
def _row21(p, py, px, k, anti, out, oy, ox, n):
    """``out[oy, ox + x] = sum_j k[j] * p[py, px + x + j]`` for x < ``n`` (21 taps) for a symmetric
    (``anti`` False) or antisymmetric kernel, folded on its centre and unrolled: one pass, the
    accumulator stays in registers."""
    k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, kc = k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7], k[8], k[9], k[10]
    py = _u(py)
    oy = _u(oy)
    px = _u(px)
    ox = _u(ox)
    if anti:
        for x in range(_u(n)):
            q = px + x
            out[oy, ox + x] = (
                kc * p[py, q + _u(10)] + k0 * (p[py, q] - p[py, q + _u(20)])
                + k1 * (p[py, q + _u(1)] - p[py, q + _u(19)]) + k2 * (p[py, q + _u(2)] - p[py, q + _u(18)])
                + k3 * (p[py, q + _u(3)] - p[py, q + _u(17)]) + k4 * (p[py, q + _u(4)] - p[py, q + _u(16)])
                + k5 * (p[py, q + _u(5)] - p[py, q + _u(15)]) + k6 * (p[py, q + _u(6)] - p[py, q + _u(14)])
                + k7 * (p[py, q + _u(7)] - p[py, q + _u(13)]) + k8 * (p[py, q + _u(8)] - p[py, q + _u(12)])
                + k9 * (p[py, q + _u(9)] - p[py, q + _u(11)])
            )
    else:
        for x in range(_u(n)):
            q = px + x
            out[oy, ox + x] = (
                kc * p[py, q + _u(10)] + k0 * (p[py, q] + p[py, q + _u(20)])
                + k1 * (p[py, q + _u(1)] + p[py, q + _u(19)]) + k2 * (p[py, q + _u(2)] + p[py, q + _u(18)])
                + k3 * (p[py, q + _u(3)] + p[py, q + _u(17)]) + k4 * (p[py, q + _u(4)] + p[py, q + _u(16)])
                + k5 * (p[py, q + _u(5)] + p[py, q + _u(15)]) + k6 * (p[py, q + _u(6)] + p[py, q + _u(14)])
                + k7 * (p[py, q + _u(7)] + p[py, q + _u(13)]) + k8 * (p[py, q + _u(8)] + p[py, q + _u(12)])
                + k9 * (p[py, q + _u(9)] + p[py, q + _u(11)])
            )


@njit(cache=True, nogil=True, inline="always")
def _rr(i, h, m):
    """Ring slot (uint64) of row ``i`` reflected (101) into ``[0, h)``."""
    return _u(reflect101(i, h) & m)


@njit(cache=True, nogil=True, fastmath=True)
def _col21(t, m, h, y, k, anti, out, oy, x0, x1):
    """``out[oy, x] = sum_j k[j] * T[reflect(y + j - 10), x]`` for ``x0 <= x < x1`` from the ring
    ``t`` (slot = row & ``m``), 21 taps folded and unrolled (see :func:`_row21`)."""
    k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, kc = k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7], k[8], k[9], k[10]
    a0, a1, a2, a3, a4 = _rr(y - 10, h, m), _rr(y - 9, h, m), _rr(y - 8, h, m), _rr(y - 7, h, m), _rr(y - 6, h, m)
    a5, a6, a7, a8, a9 = _rr(y - 5, h, m), _rr(y - 4, h, m), _rr(y - 3, h, m), _rr(y - 2, h, m), _rr(y - 1, h, m)
    c = _u(y & m)
    b9, b8, b7, b6, b5 = _rr(y + 1, h, m), _rr(y + 2, h, m), _rr(y + 3, h, m), _rr(y + 4, h, m), _rr(y + 5, h, m)
    b4, b3, b2, b1, b0 = _rr(y + 6, h, m), _rr(y + 7, h, m), _rr(y + 8, h, m), _rr(y + 9, h, m), _rr(y + 10, h, m)
    oy = _u(oy)
    if anti:
        for x in range(_u(x0), _u(x1)):
            out[oy, x] = (
                kc * t[c, x] + k0 * (t[a0, x] - t[b0, x]) + k1 * (t[a1, x] - t[b1, x])
                + k2 * (t[a2, x] - t[b2, x]) + k3 * (t[a3, x] - t[b3, x]) + k4 * (t[a4, x] - t[b4, x])
                + k5 * (t[a5, x] - t[b5, x]) + k6 * (t[a6, x] - t[b6, x]) + k7 * (t[a7, x] - t[b7, x])
                + k8 * (t[a8, x] - t[b8, x]) + k9 * (t[a9, x] - t[b9, x])
            )
    else:
        for x in range(_u(x0), _u(x1)):
            out[oy, x] = (
                kc * t[c, x] + k0 * (t[a0, x] + t[b0, x]) + k1 * (t[a1, x] + t[b1, x])
                + k2 * (t[a2, x] + t[b2, x]) + k3 * (t[a3, x] + t[b3, x]) + k4 * (t[a4, x] + t[b4, x])
                + k5 * (t[a5, x] + t[b5, x]) + k6 * (t[a6, x] + t[b6, x]) + k7 * (t[a7, x] + t[b7, x])
                + k8 * (t[a8, x] + t[b8, x]) + k9 * (t[a9, x] + t[b9, x])
            )


@njit(cache=True, nogil=True, fastmath=True)
def _row_any(p, py, px, k, anti, out, oy, ox, n):
    """:func:`_row21` for any odd kernel size (a pass per tap pair)."""
    r = k.shape[0] // 2
    py = _u(py)
    oy = _u(oy)
    px = _u(px)
    ox = _u(ox)
    kc = k[r]
    for x in range(_u(n)):
        out[oy, ox + x] = kc * p[py, px + x + _u(r)]
    for j in range(r):
        kj = k[j]
        a = px + _u(j)
        b = px + _u(2 * r - j)
        for x in range(_u(n)):
            out[oy, ox + x] += kj * (p[py, a + x] - p[py, b + x] if anti else p[py, a + x] + p[py, b + x])


@njit(cache=True, nogil=True, fastmath=True)
def _col_any(t, m, h, y, k, anti, out, oy, x0, x1):
    """:func:`_col21` for any odd kernel size."""
    r = k.shape[0] // 2
    kc = k[r]
    c = _u(y & m)
    oy = _u(oy)
    for x in range(_u(x0), _u(x1)):
        out[oy, x] = kc * t[c, x]
    for j in range(r):
        kj = k[j]
        a = _rr(y + j - r, h, m)
        b = _rr(y + r - j, h, m)
        for x in range(_u(x0), _u(x1)):
            out[oy, x] += kj * (t[a, x] - t[b, x] if anti else t[a, x] + t[b, x])


@njit(cache=True, nogil=True)
def _pad_row(src, sy, x0, x1, lidx, ridx, pad):
    """``pad[0, r + x] = src[sy, reflect101(x)]`` for ``x0 - r <= x < x1 + r``: what a row pass of
    columns ``x0..x1 - 1`` reads (``src[sy, lidx]`` / ``src[sy, ridx]`` are the ``r`` reflected
    pixels before / after the row: index tables made once per tile)."""
    w = src.shape[1]
    r = lidx.shape[0]
    sy = _u(sy)
    ru = _u(r)
    for x in range(_u(max(x0 - r, 0)), _u(min(x1 + r, w))):
        pad[0, ru + x] = src[sy, x]
    for i in range(min(x0, r), r):  # x = i - r in [x0 - r, 0)
        pad[0, i] = src[sy, lidx[i]]
    for i in range(max(x1 + r - w, 0)):  # x = w + i
        pad[0, r + w + i] = src[sy, ridx[i]]


@njit(cache=True, nogil=True)
def _energy_hovernet(sa, sb, sy, fg, hmin, sh, vmin, sv, thr, e, ey, seeds, y, w):
    """HoVer-Net's energy row ``e[ey]``: ``1 - max(1 - norm(sobel_h), 1 - norm(sobel_v))`` inside the
    foreground (0 outside), and the marker seeds ``seeds[y] = fg & (max(...) < thr)``."""
    sy = _u(sy)
    ey = _u(ey)
    y = _u(y)
    for x in range(_u(w)):
        a = 1.0 - (sa[sy, x] - hmin) * sh
        b = 1.0 - (sb[sy, x] - vmin) * sv
        o = a if a > b else b
        if o < 0.0:
            o = 0.0
        f = fg[y, x] != 0
        e[ey, x] = (1.0 - o) if f else 0.0
        seeds[y, x] = 1 if (f and o < thr) else 0


@njit(cache=True, nogil=True)
def _energy_optimus(sa, sb, sy, fg, slope, e, ey, seeds, y, w):
    """``optimus`` energy row ``max(-sobel_h, -sobel_v)`` and the marker seeds (both slopes > slope)."""
    sy = _u(sy)
    ey = _u(ey)
    y = _u(y)
    for x in range(_u(w)):
        a = sa[sy, x]
        b = sb[sy, x]
        e[ey, x] = -a if a < b else -b
        seeds[y, x] = 1 if (fg[y, x] != 0 and a > slope and b > slope) else 0


@njit(cache=True, nogil=True)
def _hsum_row(e, slot, hs):
    """``hs[slot] = [1, 2, 1]`` along x of energy row ``e[slot]`` (float64, reflect-101): the
    horizontal half of the 3x3 blur, made once per row and read by the three output rows it feeds."""
    w = e.shape[1]
    s = _u(slot)
    one = _u(1)
    for x in range(one, _u(w - 1)):
        hs[s, x] = e[s, x - one] + 2.0 * e[s, x] + e[s, x + one]
    for x in (0, w - 1):  # the border columns (the same one when w == 1)
        hs[s, _u(x)] = e[s, _u(reflect101(x - 1, w))] + 2.0 * e[s, _u(x)] + e[s, _u(reflect101(x + 1, w))]


@njit(cache=True, nogil=True)
def _blur_row(hs, m, h, y, sign, out, blocks, g):
    """``out[y + 1, 1 + x] = sign * gaussian3x3(E)[y, x]`` (OpenCV's [1, 2, 1] / 4, reflect-101) from
    the ring of horizontal sums ``hs`` (slot = row & ``m``) into the framed relief map, on the column
    blocks ``blocks[g]`` flags (the only relief read later is the foreground's, which they cover). The
    same float64 sums in the same order as the whole 3x3 stencil would give."""
    w = hs.shape[1]
    r0 = _rr(y - 1, h, m)
    r1 = _u(y & m)
    r2 = _rr(y + 1, h, m)
    oy = _u(y + 1)
    one = _u(1)
    nblk = blocks.shape[1]
    b = 0
    while b < nblk:
        if blocks[g, b] == 0:
            b += 1
            continue
        be = b + 1
        while be < nblk and blocks[g, be] != 0:
            be += 1
        for x in range(_u(b * _SKIPBLOCK), _u(min(be * _SKIPBLOCK, w))):
            out[oy, x + one] = sign * (hs[r0, x] + 2.0 * hs[r1, x] + hs[r2, x]) * 0.0625
        b = be


@njit(cache=True, nogil=True)
def _row_minmax(a, b, oy, y, rowmm):
    """Min and max of row ``oy`` of the two Sobel scratch maps into ``rowmm[y]`` (int32 (H, 4)), as
    order-preserving integer keys of the float32 bits: integer min / max reductions vectorise, float
    ones (NaN-aware) do not. :func:`_key_range` turns them back into floats."""
    ai = a.view(np.int32)
    bi = b.view(np.int32)
    m = np.int32(0x7FFFFFFF)
    amin = m
    amax = np.int32(-0x80000000)
    bmin = amin
    bmax = amax
    oy = _u(oy)
    for x in range(_u(a.shape[1])):
        v = ai[oy, x]
        k = v ^ ((v >> 31) & m)
        amin = k if k < amin else amin
        amax = k if k > amax else amax
        v = bi[oy, x]
        k = v ^ ((v >> 31) & m)
        bmin = k if k < bmin else bmin
        bmax = k if k > bmax else bmax
    rowmm[y, 0] = amin
    rowmm[y, 1] = amax
    rowmm[y, 2] = bmin
    rowmm[y, 3] = bmax


@njit(cache=True, nogil=True)
def _key_range(rowmm, h):
    """Tile-wide (hmin, hmax, vmin, vmax) as float64 from the per-row keys of :func:`_row_minmax`."""
    m = np.int32(0x7FFFFFFF)
    k = np.empty(4, np.int32)
    k[0] = rowmm[0, 0]
    k[1] = rowmm[0, 1]
    k[2] = rowmm[0, 2]
    k[3] = rowmm[0, 3]
    for y in range(1, h):
        k[0] = min(k[0], rowmm[y, 0])
        k[1] = max(k[1], rowmm[y, 1])
        k[2] = min(k[2], rowmm[y, 2])
        k[3] = max(k[3], rowmm[y, 3])
    for i in range(4):
        k[i] = k[i] ^ ((k[i] >> 31) & m)
    f = k.view(np.float32)
    return np.float64(f[0]), np.float64(f[1]), np.float64(f[2]), np.float64(f[3])


@njit(cache=True, nogil=True)
def _gather_runs(a, b, oy, cs, ce, crow, clab, y, k, out_a, out_b):
    """Copy the values of row ``oy`` of ``a``/``b`` on the kept foreground runs of image row ``y``
    to ``out_a``/``out_b`` from index ``k`` on."""
    oy = _u(oy)
    for i in range(crow[y], crow[y + 1]):
        if clab[i] != 0:
            for x in range(_u(cs[i]), _u(ce[i])):
                out_a[k] = a[oy, x]
                out_b[k] = b[oy, x]
                k += 1


@njit(cache=True, nogil=True)
def _energy_hovernet_runs(ka, kb, cs, ce, crow, clab, y, k, hmin, sh, vmin, sv, thr, e, ey, seeds):
    """:func:`_energy_hovernet` of image row ``y`` from the kept foreground values (from index ``k``):
    0 energy and no seed off the foreground, the same arithmetic on it."""
    ey = _u(ey)
    yu = _u(y)
    for x in range(_u(e.shape[1])):
        e[ey, x] = 0.0
        seeds[yu, x] = 0
    for i in range(crow[y], crow[y + 1]):
        if clab[i] != 0:
            for x in range(_u(cs[i]), _u(ce[i])):
                a = 1.0 - (ka[k] - hmin) * sh
                b = 1.0 - (kb[k] - vmin) * sv
                o = a if a > b else b
                if o < 0.0:
                    o = 0.0
                e[ey, x] = 1.0 - o
                seeds[yu, x] = 1 if o < thr else 0
                k += 1


@njit(cache=True, nogil=True)
def _scale(lo, hi):
    """1 / (hi - lo), or 0 for a flat map (OpenCV NORM_MINMAX)."""
    return 1.0 / (hi - lo) if hi - lo > 2.220446049250313e-16 else 0.0


@njit(cache=True, nogil=True)
def _stage_relief(hmap, vmap, deriv, smooth, mode, marker_thr, slope, rng, ws):
    """Sobel, energy, marker seeds (``ws.seeds``) and relief (``ws.relief``, framed like the work map),
    streamed row by row.

    ``hovernet`` mode with ``rng[4] != 0`` measures the tile-wide Sobel range first (the foreground
    pixels' Sobel values kept, energy in a second stream); returns the range used (hmin, hmax, vmin,
    vmax)."""
    h, w = hmap.shape
    fg, seeds, ring_h, ring_v, pad = ws.fg, ws.seeds, ws.ring_h, ws.ring_v, ws.pad_row
    sob_h, sob_v, rowmm, ering = ws.sobel_h, ws.sobel_v, ws.row_minmax, ws.energy_ring
    relief, hsum = ws.relief, ws.blur_sums
    m = ring_h.shape[0] - 1
    r = deriv.shape[0] // 2
    measure = mode == MODE_HOVERNET and rng[4] != 0.0
    hmin, hmax, vmin, vmax = rng[0], rng[1], rng[2], rng[3]
    sh = _scale(hmin, hmax)
    sv = _scale(vmin, vmax)
    sign = -1.0 if mode == MODE_HOVERNET else 1.0
    # The per-row work calls leaf kernels only, straight from here: an intermediate helper passing
    # the arrays on costs reference-count updates around every inner call.
    lidx = np.empty(r, np.int64)
    ridx = np.empty(r, np.int64)
    for i in range(r):
        lidx[i] = reflect101(i - r, w)
        ridx[i] = reflect101(w + i, w)
    # Without a tile-wide range to measure, a Sobel value is read only within one pixel (8-neighbours)
    # of the foreground: by the seeds (foreground pixels), by the relief of foreground pixels (the
    # 3x3 blur) and by nothing else (the flood reads the relief of foreground pixels only). So the
    # column pass skips the blocks of _SKIPBLOCK columns of a row group with no foreground within a
    # pixel, and the row pass the blocks no column-pass output within r rows needs; the energy and
    # blur run on whole rows, reading stale scratch values there, which only reach relief values
    # nobody reads. ``need[y, b]``: block b of row y holds a pixel of the 1-dilated foreground of the
    # row (from the kept component runs).
    nblk = (w + _SKIPBLOCK - 1) // _SKIPBLOCK
    need, gneed = ws.col_need, ws.group_need
    # the kept foreground runs
    cs, ce, cy, crow, clab = ws.comp_start, ws.comp_end, ws.comp_y, ws.comp_rowstart, ws.comp_label
    rneed = np.ones(nblk, np.uint8)
    need[:, :] = 0
    for i in range(crow[h]):
        if clab[i] != 0:
            for b in range(max(cs[i] - 1, 0) // _SKIPBLOCK, min(ce[i], w - 1) // _SKIPBLOCK + 1):
                need[cy[i], b] = 1
    # gneed[g]: blocks the column pass computes for row group g (its rows and one more each side);
    # the blur writes the relief there too, also when measuring (the energy is 0 off the foreground)
    for g in range((h + _GROUP - 1) // _GROUP):
        for b in range(nblk):
            gneed[g, b] = 0
        for yy in range(max(g * _GROUP - 1, 0), min((g + 1) * _GROUP + 1, h)):
            for b in range(nblk):
                gneed[g, b] |= need[yy, b]
    # Measuring the range: the energy needs the Sobel values of the foreground pixels only (it is 0
    # elsewhere), so only those are kept (``kept_h``/``kept_v``, in run order from ``fgoff[y]`` for
    # row y), not the two full maps.
    kept_h, kept_v, fgoff = ws.heap.view(np.float32), ws.keys.view(np.float32), ws.comp_rowstart.copy()
    if measure:
        k = 0
        for y in range(h):
            fgoff[y] = k
            for i in range(crow[y], crow[y + 1]):
                if clab[i] != 0:
                    k += ce[i] - cs[i]
    done = 0
    for y0 in range(0, h, _GROUP):
        y1 = min(y0 + _GROUP, h)
        last = min(y1 - 1 + r, h - 1)
        while done <= last:  # row pass of the rows the column pass of rows y0..y1 - 1 needs
            slot = done & m
            if not measure:  # the blocks some column-pass output within r rows computes
                rneed[:] = 0
                for g in range(max(done - r, 0) // _GROUP, min(done + r, h - 1) // _GROUP + 1):
                    for b in range(nblk):
                        rneed[b] |= gneed[g, b]
            b = 0
            while b < nblk:
                if rneed[b] == 0:
                    b += 1
                    continue
                be = b + 1
                while be < nblk and rneed[be] != 0:
                    be += 1
                x0 = b * _SKIPBLOCK
                x1 = min(be * _SKIPBLOCK, w)
                b = be
                _pad_row(hmap, done, x0, x1, lidx, ridx, pad)
                if r == 10:
                    _row21(pad, 0, x0, deriv, True, ring_h, slot, x0, x1 - x0)
                else:
                    _row_any(pad, 0, x0, deriv, True, ring_h, slot, x0, x1 - x0)
                _pad_row(vmap, done, x0, x1, lidx, ridx, pad)
                if r == 10:
                    _row21(pad, 0, x0, smooth, False, ring_v, slot, x0, x1 - x0)
                else:
                    _row_any(pad, 0, x0, smooth, False, ring_v, slot, x0, x1 - x0)
            done += 1
        # column pass of the group, a block of columns at a time: the group's ring rows of one
        # block stay in L1 across its output rows (rows 0..G-1 of the Sobel maps are the scratch
        # unless the maps are kept); without a range to measure, only the column ranges near the
        # foreground (see above)
        g = y0 // _GROUP
        for xb0 in range(0, w, _COLBLOCK):
            xb1 = min(xb0 + _COLBLOCK, w)
            b = xb0 // _SKIPBLOCK
            bend = (xb1 + _SKIPBLOCK - 1) // _SKIPBLOCK
            while b < bend:
                if not measure and gneed[g, b] == 0:
                    b += 1
                    continue
                be = b + 1
                while be < bend and (measure or gneed[g, be] != 0):
                    be += 1
                x0 = b * _SKIPBLOCK
                x1 = min(be * _SKIPBLOCK, xb1)
                b = be
                for y in range(y0, y1):
                    if r == 10:
                        _col21(ring_h, m, h, y, smooth, False, sob_h, y - y0, x0, x1)
                    else:
                        _col_any(ring_h, m, h, y, smooth, False, sob_h, y - y0, x0, x1)
                for y in range(y0, y1):
                    if r == 10:
                        _col21(ring_v, m, h, y, deriv, True, sob_v, y - y0, x0, x1)
                    else:
                        _col_any(ring_v, m, h, y, deriv, True, sob_v, y - y0, x0, x1)
        for y in range(y0, y1):
            oy = y - y0
            if measure:  # keep the foreground pixels' values for the energy once the range is known
                _row_minmax(sob_h, sob_v, oy, y, rowmm)
                _gather_runs(sob_h, sob_v, oy, cs, ce, crow, clab, y, fgoff[y], kept_h, kept_v)
                continue
            if mode == MODE_HOVERNET:
                _energy_hovernet(sob_h, sob_v, oy, fg, hmin, sh, vmin, sv, marker_thr, ering, y & 3, seeds, y, w)
            else:
                _energy_optimus(sob_h, sob_v, oy, fg, slope, ering, y & 3, seeds, y, w)
            _hsum_row(ering, y & 3, hsum)
            if y > 0:
                _blur_row(hsum, 3, h, y - 1, sign, relief, gneed, (y - 1) // _GROUP)
    if measure:
        hmin, hmax, vmin, vmax = _key_range(rowmm, h)
        sh = _scale(hmin, hmax)
        sv = _scale(vmin, vmax)
        for y in range(h):
            _energy_hovernet_runs(kept_h, kept_v, cs, ce, crow, clab, y, fgoff[y], hmin, sh, vmin, sv,
                                  marker_thr, ering, y & 3, seeds)
            _hsum_row(ering, y & 3, hsum)
            if y > 0:
                _blur_row(hsum, 3, h, y - 1, sign, relief, gneed, (y - 1) // _GROUP)
    _blur_row(hsum, 3, h, h - 1, sign, relief, gneed, (h - 1) // _GROUP)
    return hmin, hmax, vmin, vmax


@njit(cache=True, nogil=True)
def sobel_minmax(hmap, vmap, deriv, smooth, ws):
    """Tile-wide (min, max) of the Sobel of H along x and of V along y: (hmin, hmax, vmin, vmax)
    (the passes of :func:`_stage_relief`, whole rows, nothing else)."""
    h, w = hmap.shape
    ring_h, ring_v, pad = ws.ring_h, ws.ring_v, ws.pad_row
    sob_h, sob_v, rowmm = ws.sobel_h, ws.sobel_v, ws.row_minmax
    m = ring_h.shape[0] - 1
    r = deriv.shape[0] // 2
    lidx = np.empty(r, np.int64)
    ridx = np.empty(r, np.int64)
    for i in range(r):
        lidx[i] = reflect101(i - r, w)
        ridx[i] = reflect101(w + i, w)
    done = 0
    for y in range(h):
        while done <= min(y + r, h - 1):
            slot = done & m
            _pad_row(hmap, done, 0, w, lidx, ridx, pad)
            if r == 10:
                _row21(pad, 0, 0, deriv, True, ring_h, slot, 0, w)
            else:
                _row_any(pad, 0, 0, deriv, True, ring_h, slot, 0, w)
            _pad_row(vmap, done, 0, w, lidx, ridx, pad)
            if r == 10:
                _row21(pad, 0, 0, smooth, False, ring_v, slot, 0, w)
            else:
                _row_any(pad, 0, 0, smooth, False, ring_v, slot, 0, w)
            done += 1
        if r == 10:
            _col21(ring_h, m, h, y, smooth, False, sob_h, 0, 0, w)
            _col21(ring_v, m, h, y, deriv, True, sob_v, 0, 0, w)
        else:
            _col_any(ring_h, m, h, y, smooth, False, sob_h, 0, 0, w)
            _col_any(ring_v, m, h, y, deriv, True, sob_v, 0, 0, w)
        _row_minmax(sob_h, sob_v, 0, y, rowmm)
    return _key_range(rowmm, h)


# ------------------------------------------------------------------------------------- watershed


@njit(cache=True, nogil=True)
def _ws_prepare(cs, ce, cy, crow, clab, ncomp, ms, me, my, mrow, mlab, nmr, nmark, keep_unmarked, out, order):
    """Label the foreground components that need no flood and list those that do.

    A component with one marker label is that label (what the flood gives), one without stays 0
    (labels ``nmark + 1, ...`` in component order with ``keep_unmarked``), exactly as the global
    flood. A marker belongs to the component of its last pixel in raster order. Writes ``out`` (every
    pixel) and, for the j-th component holding >= 2 markers, its runs (in raster order) into
    ``order[ostart[j]:ostart[j + 1]]``; its queue lives at ``heap_base[j]:heap_base[j + 1]`` (its
    area). Returns ``(nlab, nmulti, ostart, heap_base, lut, nm)``: ``lut[c]`` the label painted on
    component ``c`` (0 for flooded ones), ``nm[c]`` its marker count.
    """
    h = out.shape[0]
    lastrun = np.full(nmark + 1, -1, np.int64)
    for i in range(nmr):
        if mlab[i] > 0:
            lastrun[mlab[i]] = i
    nm = np.zeros(ncomp + 1, np.int32)
    lut = np.zeros(ncomp + 1, np.int32)
    for mk in range(1, nmark + 1):
        i = lastrun[mk]
        c = 0
        if i >= 0:  # label of the component run holding the marker's last pixel (binary search)
            y = my[i]
            x = me[i] - 1
            lo = crow[y]
            hi = crow[y + 1]
            while lo < hi:
                mid = (lo + hi) >> 1
                if ce[mid] <= x:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < crow[y + 1] and cs[lo] <= x:
                c = clab[lo]
        if c > 0:
            nm[c] += 1
            lut[c] = mk
    nlab = nmark
    nmulti = 0
    for c in range(ncomp + 1):
        if nm[c] != 1:
            lut[c] = 0
        if keep_unmarked and c > 0 and nm[c] == 0:
            nlab += 1
            lut[c] = nlab
        if nm[c] > 1:
            nmulti += 1
    ncr = crow[h]
    _paint_lut(cs, ce, cy, ncr, clab, lut, out)
    slot = np.full(ncomp + 1, -1, np.int32)
    j = 0
    for c in range(1, ncomp + 1):
        if nm[c] > 1:
            slot[c] = j
            j += 1
    ostart = np.empty(nmulti + 1, np.int64)
    heap_base = np.empty(nmulti + 1, np.int64)
    cnt = np.zeros(nmulti + 1, np.int64)
    area = np.zeros(nmulti + 1, np.int64)
    for i in range(ncr):
        s = slot[clab[i]]
        if s >= 0:
            cnt[s + 1] += 1
            area[s + 1] += ce[i] - cs[i]
    ostart[0] = 0
    heap_base[0] = 0
    for s in range(nmulti):
        ostart[s + 1] = ostart[s] + cnt[s + 1]
        heap_base[s + 1] = heap_base[s] + area[s + 1]
    fill = ostart[:nmulti].copy()
    for i in range(ncr):
        s = slot[clab[i]]
        if s >= 0:
            order[fill[s]] = i
            fill[s] += 1
    return nlab, nmulti, ostart, heap_base, lut, nm


@njit(cache=True, nogil=True, inline="always")
def _bucket(r, rmin, inv, nb):
    b = int((np.float64(r) - rmin) * inv)
    return b if b < nb else nb - 1


@njit(cache=True, nogil=True)
def _flood(s, order, ostart, heap_base, cs, ce, cy, work, relief, heap, keyv, pix, nxt, heads, out):
    """Priority flood (4-connected, ties first-in first-out) of one component from its markers.

    ``work`` (H + 2, W + 2) int32 is the label map with a one-pixel frame: -1 outside the
    component (background, the frame, other components), marker labels on marker pixels (painted
    by :func:`_stage_markers`); the component's other pixels are set to 0 here and receive their
    labels, which are then copied into ``out`` (H, W) and reset to -1 in the work map. ``relief``
    has the same frame. Pixels are flat indices into these maps, so a neighbour is
    ``q +- 1``, ``q +- (W + 2)`` with no bounds tests, and "unlabelled pixel of this component" is
    ``work[q] == 0`` (a foreground neighbour is in the same component).

    Keys are single int64 ``relief << 32 | insertion number`` (the float's bits made sortable); the
    pixel of insertion ``a`` is ``pix[a]`` (a component inserts each pixel at most once, so both fit
    its area). The queue: the relief range of the component cut into ``nb`` equal buckets; pushes into
    buckets above the current one go onto that bucket's list (``heads`` / ``nxt``), all others into
    the binary heap, which is refilled from the next non-empty bucket when it runs dry. Every heap
    entry is below every listed one, so pops come in exactly the one-heap order, from small heaps.
    A component with a non-finite relief uses one bucket (the plain heap).

    The heap operations are written out in the loop: helpers taking the heap array would cost
    reference-count updates on every call."""
    w2 = _u(work.shape[1])
    # flat pixel indices are uint64 (no negative-index wraparound code); the steps up, down, left,
    # right wrap around modulo 2**64, which is the subtraction
    step = np.array([-work.shape[1], work.shape[1], -1, 1]).astype(np.uint64)
    one = _u(1)
    wk = work.reshape(work.size)
    rl = relief.reshape(relief.size)
    bits = rl.view(np.int32)
    b0 = heap_base[s]
    b1 = heap_base[s + 1]
    area = b1 - b0
    hk = heap[b0:b1]
    kv = keyv[b0:b1]
    px = pix[b0:b1]
    nx = nxt[b0:b1]
    t0 = ostart[s]
    t1 = ostart[s + 1]
    rmin = np.inf
    rmax = -np.inf
    finite = True
    for t in range(t0, t1):
        i = order[t]
        q0 = _u(cy[i] + 1) * w2 + one
        for q in range(q0 + _u(cs[i]), q0 + _u(ce[i])):
            if wk[q] < 0:
                wk[q] = 0
            r = rl[q]
            rmin = min(rmin, r)
            rmax = max(rmax, r)
            finite &= (r - r) == 0.0
    nb = 1
    inv = 0.0
    rmin64 = 0.0
    if finite and rmax > rmin:
        nb = min(max(area >> 2, 1), _NB_MAX)
        rmin64 = np.float64(rmin)
        inv = nb / (np.float64(rmax) - rmin64)
    for c in range(nb):
        heads[c] = -1
    # seeds in raster order; a seed without an unlabelled neighbour would pop without effect, so it
    # is not queued (the relative order of all other insertions is unchanged)
    age = 0
    for t in range(t0, t1):
        i = order[t]
        q0 = _u(cy[i] + 1) * w2 + one
        for q in range(q0 + _u(cs[i]), q0 + _u(ce[i])):
            if wk[q] > 0 and (wk[q - w2] == 0 or wk[q + w2] == 0 or wk[q - one] == 0 or wk[q + one] == 0):
                px[age] = q
                kv[age] = (sortable_bits(bits[q]) << 32) | age
                bk = _bucket(rl[q], rmin64, inv, nb)
                nx[age] = heads[bk]
                heads[bk] = age
                age += 1
    cur = -1
    size = 0
    while True:
        while size == 0:  # refill the heap from the next non-empty bucket
            cur += 1
            if cur >= nb:
                break
            e = heads[cur]
            while e >= 0:
                key = kv[e]
                j = size
                while j > 0:
                    pj = (j - 1) >> 1
                    pk = hk[pj]
                    if key < pk:
                        hk[j] = pk
                        j = pj
                    else:
                        break
                hk[j] = key
                size += 1
                e = nx[e]
        if size == 0:
            break
        top = hk[0]  # pop
        size -= 1
        if size > 0:
            key = hk[size]
            j = 0
            while True:
                c = 2 * j + 1
                if c >= size:
                    break
                ck = hk[c]
                if c + 1 < size and hk[c + 1] < ck:
                    c += 1
                    ck = hk[c]
                if ck < key:
                    hk[j] = ck
                    j = c
                else:
                    break
            hk[j] = key
        p = _u(px[top & 0xFFFFFFFF])
        lab = wk[p]
        # unlabelled neighbours as a bit mask first (one hard-to-predict branch per pop, not four),
        # then visited up, down, left, right: the reference's neighbour order
        free = (
            (wk[p - w2] == 0) * 1 + (wk[p + w2] == 0) * 2 + (wk[p - one] == 0) * 4 + (wk[p + one] == 0) * 8
        )
        while free != 0:
            q = p + step[cttz64(_u(free))]
            free &= free - 1
            wk[q] = lab
            px[age] = q
            key = (sortable_bits(bits[q]) << 32) | age
            bk = _bucket(rl[q], rmin64, inv, nb)
            if bk <= cur:  # heap push
                j = size
                while j > 0:
                    pj = (j - 1) >> 1
                    pk = hk[pj]
                    if key < pk:
                        hk[j] = pk
                        j = pj
                    else:
                        break
                hk[j] = key
                size += 1
            else:
                kv[age] = key
                nx[age] = heads[bk]
                heads[bk] = age
            age += 1
    for t in range(t0, t1):  # the result into ``out``, the work map back to -1, while both are cached
        i = order[t]
        y = _u(cy[i])
        q0 = (y + one) * w2 + one
        for x in range(_u(cs[i]), _u(ce[i])):
            out[y, x] = wk[q0 + x]
            wk[q0 + x] = -1
    return area


# ------------------------------------------------------------------------------------- table


@njit(cache=True, nogil=True)
def _table_moments(cs, ce, cy, crow, clab, lut, nm, inst, n):
    """Area, pixel sums, bounding box (x0, y0, x1, y1) and first pixel (x, y) in raster order of
    instances 1..n, from the component runs: whole runs of the components painted with one label,
    runs of equal labels read off the map in the flooded ones (runs come in raster order, so the first
    pixel is the first one seen). Pixel sums are exact (integers in float64), as pixel by pixel.

    (The per-run update is written out twice rather than put in a helper: a helper taking the output
    arrays costs reference-count updates on every call.)"""
    h = inst.shape[0]
    area = np.zeros(n, np.int64)
    sx = np.zeros(n, np.float64)
    sy = np.zeros(n, np.float64)
    bbox = np.zeros((n, 4), np.int32)
    start = np.zeros((n, 2), np.int64)
    for i in range(crow[h]):
        c = clab[i]
        if c == 0:
            continue
        y = cy[i]
        x = cs[i]
        x1 = ce[i]
        flooded = nm[c] > 1
        while x < x1:
            if flooded:  # runs of equal labels
                v = inst[y, x]
                x0 = x
                x += 1
                while x < x1 and inst[y, x] == v:
                    x += 1
            else:
                v = lut[c]
                x0 = x
                x = x1
            if v <= 0:
                continue
            k = v - 1
            ln = x - x0
            if area[k] == 0:
                start[k, 0] = x0
                start[k, 1] = y
                bbox[k, 0] = x0
                bbox[k, 1] = y
                bbox[k, 2] = x
            else:
                bbox[k, 0] = min(bbox[k, 0], x0)
                bbox[k, 2] = max(bbox[k, 2], x)
            bbox[k, 3] = y + 1
            area[k] += ln
            sx[k] += 0.5 * (x0 + x - 1) * ln
            sy[k] += np.float64(y) * ln
    return area, sx, sy, bbox, start


# ------------------------------------------------------------------------------------- pipeline


def _aligned(shape: tuple, dtype: type, fill: float | None = None) -> np.ndarray:
    """A C-contiguous array whose data start on a 64-byte (cache line, zmm) boundary (uninitialised
    unless ``fill`` is given)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    off = -raw.ctypes.data % 64
    a = raw[off : off + nbytes].view(dt).reshape(shape)
    if fill is not None:
        a[...] = fill
    return a


class HVWorkspace(NamedTuple):
    """The scratch arrays of :func:`hv_tile` for one (h, w) tile and Sobel size (:func:`hv_workspace`).

    A NamedTuple: Numba takes it as a heterogeneous tuple, and the kernels name each array. Runs are
    row-major ``(start, end, y)`` triples with a per-row start index (``*_rowstart``, h + 1 entries).
    ``heap`` and ``keys`` have a second use in :func:`_stage_relief`, before the flood needs them: as
    float32 views they hold the kept foreground's Sobel H and V (one buffer each instead of two).
    """

    comp_start: np.ndarray  # foreground component runs (int32) ...
    comp_end: np.ndarray
    comp_y: np.ndarray
    comp_rowstart: np.ndarray  # (h + 1,) int64
    comp_label: np.ndarray  # ... and each run's component label
    mark_start: np.ndarray  # marker runs ...
    mark_end: np.ndarray
    mark_y: np.ndarray
    mark_rowstart: np.ndarray
    mark_label: np.ndarray  # ... and each run's marker label
    parent: np.ndarray  # union-find parents of runs
    fg: np.ndarray  # (h, wp) uint8 foreground mask
    work: np.ndarray  # (h + 2, w + 2) int32 framed work map of the floods (-1 between calls)
    seeds: np.ndarray  # (h, wp) uint8 marker seeds
    morph_a: np.ndarray  # (h, wp) uint8 morphology scratch
    morph_b: np.ndarray  # (h, wp) uint8 morphology scratch
    ring_h: np.ndarray  # row-pass H ring (float32, cache-line rows)
    ring_v: np.ndarray  # row-pass V ring
    pad_row: np.ndarray  # padded input row
    sobel_h: np.ndarray  # Sobel H of a row group
    sobel_v: np.ndarray  # Sobel V of a row group
    row_minmax: np.ndarray  # (h, 4) int32 per-row Sobel min / max (sortable keys)
    energy_ring: np.ndarray  # (4, w) float32 energy ring
    relief: np.ndarray  # (h + 2, w + 2) float32 relief, framed like the work map
    heap: np.ndarray  # int64 flood heap; first the kept foreground's Sobel H (as float32)
    keys: np.ndarray  # int64 queued keys; first the kept foreground's Sobel V (as float32)
    pixels: np.ndarray  # int64 queued pixels
    bucket_next: np.ndarray  # int32 bucket lists
    bucket_heads: np.ndarray  # int32 bucket heads
    flood_order: np.ndarray  # int32 flood run order
    seed_start: np.ndarray  # seed runs (hole filling) ...
    seed_end: np.ndarray
    seed_y: np.ndarray
    seed_rowstart: np.ndarray
    gap_start: np.ndarray  # background runs (hole filling) ...
    gap_end: np.ndarray
    gap_y: np.ndarray
    gap_rowstart: np.ndarray
    hole: np.ndarray  # uint8 hole flag per background run
    blur_sums: np.ndarray  # (4, w) float64 ring of horizontal blur sums
    col_need: np.ndarray  # (h, nblk) uint8 column blocks near the foreground, per row
    group_need: np.ndarray  # the same, per row group


def hv_workspace(h: int, w: int, ksize: int = 21) -> HVWorkspace:
    """Scratch arrays for one (h, w) tile and Sobel size. Kept by the caller across calls, one per
    thread: first-touch page faults of fresh buffers would cost as much as the work on a 1024 px
    tile. The float rows the Sobel passes stream through start on cache lines (with ``W`` a multiple
    of 16), so their vector loads and stores do not straddle two."""
    runs = h * (w // 2 + 2) + 1
    hw = h * w + 1
    wp = (w + 15) // 8 * 8  # byte masks: whole uint64 words per row, padding columns zero
    wr = (w + 15) // 16 * 16 + 16  # ring rows: whole cache lines, stride off 4 KiB multiples
    r = ksize // 2
    ring = 1
    while ring < 2 * r + _GROUP:  # the rows one group of column-pass outputs reads
        ring *= 2
    nblk = (w + _SKIPBLOCK - 1) // _SKIPBLOCK
    i32r = lambda: np.empty(runs, np.int32)
    u8 = lambda: np.zeros((h, wp), np.uint8)
    return HVWorkspace(
        i32r(), i32r(), i32r(), np.empty(h + 1, np.int64), i32r(),  # 0-4 component runs + labels
        i32r(), i32r(), i32r(), np.empty(h + 1, np.int64), i32r(),  # 5-9 marker runs + labels
        i32r(),  # 10 union-find parents
        u8(),  # 11 foreground mask
        np.full((h + 2, w + 2), -1, np.int32),  # 12 framed work map of the floods (-1 between calls)
        u8(),  # 13 marker seeds
        u8(),  # 14 morphology scratch
        u8(),  # 15 morphology scratch
        _aligned((ring, wr), np.float32),  # 16 row-pass H ring
        _aligned((ring, wr), np.float32),  # 17 row-pass V ring
        _aligned((1, w + 2 * r + 16), np.float32),  # 18 padded input row
        _aligned((_GROUP, w), np.float32, 0.0),  # 19 Sobel H of a row group
        _aligned((_GROUP, w), np.float32, 0.0),  # 20 Sobel V of a row group
        np.empty((h, 4), np.int32),  # 21 per-row Sobel min / max (sortable keys)
        _aligned((4, w), np.float32),  # 22 energy ring
        np.empty((h + 2, w + 2), np.float32),  # 23 relief, framed like the work map
        np.empty(hw, np.int64),  # 24 heap; kept foreground Sobel H (as float32)
        np.empty(hw, np.int64),  # 25 queued keys; kept foreground Sobel V (as float32)
        np.empty(hw, np.int64),  # 26 queued pixels
        np.empty(hw, np.int32),  # 27 bucket lists
        np.empty(_NB_MAX, np.int32),  # 28 bucket heads
        i32r(),  # 29 flood run order
        i32r(), i32r(), i32r(), np.empty(h + 1, np.int64),  # 30-33 seed runs
        i32r(), i32r(), i32r(), np.empty(h + 1, np.int64),  # 34-37 background runs
        np.empty(runs, np.uint8),  # 38 hole flags
        _aligned((4, w), np.float64),  # 39 ring of horizontal blur sums
        np.empty((h, nblk), np.uint8),  # 40 column blocks near the foreground, per row
        np.empty(((h + _GROUP - 1) // _GROUP, nblk), np.uint8),  # 41 the same, per row group
    )


@njit(cache=True, nogil=True)
def _stage_components(np_prob, np_thr, min_obj, ws):
    cs, ce, cy, crow, clab = ws.comp_start, ws.comp_end, ws.comp_y, ws.comp_rowstart, ws.comp_label
    parent, fg = ws.parent, ws.fg
    h = np_prob.shape[0]
    _threshold(np_prob, np_thr, fg)
    n = _scan_runs(fg, cs, ce, cy, crow)
    _union_runs(cs, ce, crow, h, parent)
    ncomp = _number_runs(cs, ce, n, parent, min_obj, clab)
    _set_runs(cs, ce, cy, n, clab, False, fg, np.uint8(0), 0)  # small components leave the foreground
    return ncomp


@njit(cache=True, nogil=True)
def _stage_markers(mode, min_marker, w, ws):
    """Marker runs (``ws.mark_*``, labels ``ws.mark_label``), their labels painted into the framed
    work map ``ws.work``; returns (markers, marker runs)."""
    ms, me, my, mrow, mlab = ws.mark_start, ws.mark_end, ws.mark_y, ws.mark_rowstart, ws.mark_label
    parent = ws.parent
    seeds, t1, t2 = ws.seeds, ws.morph_a, ws.morph_b
    ss, se, sy, srow = ws.seed_start, ws.seed_end, ws.seed_y, ws.seed_rowstart
    gs, ge, gy, grow, hole = ws.gap_start, ws.gap_end, ws.gap_y, ws.gap_rowstart, ws.hole
    h = seeds.shape[0]
    _scan_runs(seeds, ss, se, sy, srow)
    if mode == MODE_HOVERNET:
        ng, _ = _fill_holes_runs(ss, se, srow, h, w, gs, ge, gy, grow, parent, hole, ms, me, my, mrow)
        for g in range(ng):
            if hole[g]:
                row = seeds[gy[g]]
                for x in range(gs[g], ge[g]):
                    row[x] = 1
        _open_ellipse5(seeds, w, t1, t2, seeds)  # in place: the last pass reads only the scratch
        n = _scan_runs(seeds, ms, me, my, mrow)
    else:
        ng, n = _fill_holes_runs(ss, se, srow, h, w, gs, ge, gy, grow, parent, hole, ms, me, my, mrow)
    _union_runs(ms, me, mrow, h, parent)
    nmark = _number_runs(ms, me, n, parent, min_marker, mlab)
    _paint_labels(ms, me, my, n, mlab, ws.work, 1)
    return nmark, n


@njit(cache=True, nogil=True)
def hv_tile(np_prob, hmap, vmap, np_thr, min_obj, deriv, smooth, mode, marker_thr, slope, min_marker,
            keep_unmarked, rng, ws, inst, want_table, eps, buf):
    """The whole pipeline on one tile, single-threaded (batches run tiles on several threads).

    ``np_prob`` (H, W) float, ``hmap``/``vmap`` (H, W) float32, ``deriv``/``smooth`` float32 Sobel
    kernels, ``mode`` 0 hovernet / 1 optimus, ``rng`` (5,) float64 Sobel range (h min, h max, v min,
    v max, measure flag: measured over the tile when set; ``hovernet`` mode only), ``ws`` from
    :func:`hv_workspace`. Writes ``inst`` (H, W) int32 (ids 1..n). With ``want_table`` also computes
    the instance table (``eps``: contour cut, see :func:`._numba.trace_contours`; ``buf`` (M, 2)
    float64 contour scratch, returned grown when it was too small).

    Returns ``(n, area, sum_x, sum_y, bbox, coords, offsets, contour_buffer)`` (table arrays empty
    without ``want_table``).
    """
    w = np_prob.shape[1]
    ncomp = _stage_components(np_prob, np_thr, min_obj, ws)
    _stage_relief(hmap, vmap, deriv, smooth, mode, marker_thr, slope, rng, ws)
    nmark, nmr = _stage_markers(mode, min_marker, w, ws)
    work = ws.work
    if ncomp == 0 or (nmark == 0 and not keep_unmarked):
        inst[:] = 0
        nlab = 0
        nm = np.zeros(1, np.int32)
        lut = nm
    else:
        nlab, nmulti, ostart, heap_base, lut, nm = _ws_prepare(
            ws.comp_start, ws.comp_end, ws.comp_y, ws.comp_rowstart, ws.comp_label, ncomp,
            ws.mark_start, ws.mark_end, ws.mark_y, ws.mark_rowstart, ws.mark_label, nmr, nmark,
            keep_unmarked, inst, ws.flood_order,
        )
        # (the arrays bound once: each ``ws.name`` in the call would cost reference-count updates per call)
        order, cs, ce, cy, relief = ws.flood_order, ws.comp_start, ws.comp_end, ws.comp_y, ws.relief
        heap, keyv, pix, nxt, heads = ws.heap, ws.keys, ws.pixels, ws.bucket_next, ws.bucket_heads
        for s in range(nmulti):
            _flood(s, order, ostart, heap_base, cs, ce, cy, work, relief, heap, keyv, pix, nxt, heads, inst)
    # back to all -1
    _set_runs(ws.mark_start, ws.mark_end, ws.mark_y, nmr, ws.mark_label, True, work, np.int32(-1), 1)
    if not want_table or nlab == 0:
        return (nlab, np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros((0, 4), np.int32),
                np.zeros((0, 2)), np.zeros(nlab + 1, np.int64), buf)
    area, sx, sy, bbox, start = _table_moments(ws.comp_start, ws.comp_end, ws.comp_y, ws.comp_rowstart,
                                               ws.comp_label, lut, nm, inst, nlab)
    coords, offsets, buf = trace_all(inst, start, area, eps, buf)
    return nlab, area, sx, sy, bbox, coords, offsets, buf
