"""Numba kernels of the HV post-processing pipeline (one tile, or a batch of tiles in parallel).

Called by :mod:`.hovernet`, which validates and allocates. The stages:

1. foreground ``np_prob >= thr`` as row runs; 4-connected components by union-find on the runs
   (a 1024 px tile has ~10^4 runs against 10^6 pixels), small ones dropped, painted as labels;
2. Sobel of H along x and V along y, separable, each 1-D pass folded on the kernel's (anti)symmetry,
   row by row;
3. energy, marker seeds and the 3x3-blurred relief, row by row;
4. marker seeds: holes filled (background runs not connected to the border), opened with the 5x5
   ellipse (``hovernet`` mode only) as erosions / dilations by a 5x3 box and a 5x1 column, labelled on
   runs with the small ones dropped;
5. marker-controlled watershed, one priority flood per foreground component that holds two or more
   markers: components cannot exchange pixels, and a flood's pop order restricted to one component is
   the global flood's (keys are (relief, insertion order) and insertions within a component happen in
   the same relative order), so flooding them separately, in any order or in parallel, gives the
   global result exactly, with small heaps.

Modes (``mode``): 0 ``hovernet`` (Graham et al. 2019: tile-wide min-max normalised Sobel energy,
markers ``energy < marker_thr``, 5x5 opening, relief ``-blur((1 - energy) * fg)``); 1 ``optimus``
(markers where both Sobel slopes exceed ``marker_slope`` in HV units per pixel, no opening, relief
``blur(max(-sobel_h, -sobel_v))``: no tile-wide normalisation, so a tile's result does not depend on
the rest of the tile).
"""

from __future__ import annotations

import numpy as np
from numba import get_thread_id, njit, prange

from ._numba import _find, _reflect101, _sortable

MODE_HOVERNET = 0
MODE_OPTIMUS = 1

# ---------------------------------------------------------------------------- run-length components


@njit(cache=True, nogil=True)
def _scan_prob_runs(p, thr, rs, re, ry, rowstart):
    """Runs of ``p >= thr`` per row: ``rs``/``re`` start / end (exclusive) x, ``ry`` row; returns count."""
    h, w = p.shape
    n = 0
    for y in range(h):
        rowstart[y] = n
        row = p[y]
        x = 0
        while x < w:
            while x < w and not (row[x] >= thr):
                x += 1
            if x == w:
                break
            x0 = x
            while x < w and row[x] >= thr:
                x += 1
            rs[n] = x0
            re[n] = x
            ry[n] = y
            n += 1
    rowstart[h] = n
    return n


@njit(cache=True, nogil=True)
def _scan_runs(mask, on, rs, re, ry, rowstart):
    """Runs of pixels with ``(mask != 0) == on`` per row (see :func:`_scan_prob_runs`)."""
    h, w = mask.shape
    n = 0
    for y in range(h):
        rowstart[y] = n
        row = mask[y]
        x = 0
        while x < w:
            while x < w and (row[x] != 0) != on:
                x += 1
            if x == w:
                break
            x0 = x
            while x < w and (row[x] != 0) == on:
                x += 1
            rs[n] = x0
            re[n] = x
            ry[n] = y
            n += 1
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
                ra = _find(parent, a)
                rb = _find(parent, b)
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
        r = _find(parent, i)
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
def _paint_runs(rs, re, rowstart, runlab, lut, out):
    """``out[y, run] = lut[runlab[run]]``, 0 between runs (every pixel written)."""
    h, w = out.shape
    for y in range(h):
        pos = 0
        orow = out[y]
        for i in range(rowstart[y], rowstart[y + 1]):
            for x in range(pos, rs[i]):
                orow[x] = 0
            v = lut[runlab[i]]
            for x in range(rs[i], re[i]):
                orow[x] = v
            pos = re[i]
        for x in range(pos, w):
            orow[x] = 0


@njit(cache=True, nogil=True)
def _identity_lut(m):
    lut = np.empty(m + 1, np.int32)
    for i in range(m + 1):
        lut[i] = i
    return lut


# ------------------------------------------------------------------------------------ morphology


@njit(cache=True, nogil=True)
def _fill_holes(mask, out, rs, re, ry, rowstart, parent):
    """``out`` = ``mask`` (0/1 uint8) with its holes filled (scipy ``binary_fill_holes``): background
    runs whose 4-connected set touches no image border become 1."""
    h, w = mask.shape
    n = _scan_runs(mask, False, rs, re, ry, rowstart)
    _union_runs(rs, re, rowstart, h, parent)
    border = np.zeros(n, np.uint8)
    for i in range(n):
        if ry[i] == 0 or ry[i] == h - 1 or rs[i] == 0 or re[i] == w:
            border[_find(parent, i)] = 1
    out[:, :] = mask
    for i in range(n):
        if border[_find(parent, i)] == 0:
            y = ry[i]
            for x in range(rs[i], re[i]):
                out[y, x] = 1


@njit(cache=True, nogil=True, inline="always")
def _and5_edge(row, x, w):
    v = np.uint8(1)
    for xx in range(max(x - 2, 0), min(x + 3, w)):
        v &= row[xx]
    return v


@njit(cache=True, nogil=True, inline="always")
def _or5_edge(row, x, w):
    v = np.uint8(0)
    for xx in range(max(x - 2, 0), min(x + 3, w)):
        v |= row[xx]
    return v


@njit(cache=True, nogil=True)
def _open_ellipse5(m, r5, er, out):
    """Binary opening of a 0/1 uint8 mask with OpenCV's 5x5 ellipse (rows +-2: centre column; rows
    -1..1: 5 wide), erosion treating the outside as 1 and dilation as 0 (OpenCV defaults).

    The ellipse is the union of a 5x3 box and a 1x5 column, so erosion = AND of the two erosions and
    dilation = OR of the two dilations, each a few byte-wise passes (vectorised). ``r5``, ``er`` scratch.
    """
    h, w = m.shape
    ones = np.ones(w, np.uint8)
    zeros = np.zeros(w, np.uint8)
    for y in range(h):  # r5 = horizontal 5-AND
        row = m[y]
        o = r5[y]
        for x in range(2, w - 2):
            o[x] = row[x - 2] & row[x - 1] & row[x] & row[x + 1] & row[x + 2]
        for x in range(min(2, w)):
            o[x] = _and5_edge(row, x, w)
        for x in range(max(w - 2, 2), w):
            o[x] = _and5_edge(row, x, w)
    for y in range(h):  # er = box(5x3) erosion & column(1x5) erosion
        a = r5[y - 1] if y > 0 else ones
        b = r5[y]
        c = r5[y + 1] if y < h - 1 else ones
        d = m[y - 2] if y > 1 else ones
        e = m[y + 2] if y < h - 2 else ones
        o = er[y]
        for x in range(w):
            o[x] = a[x] & b[x] & c[x] & d[x] & e[x]
    for y in range(h):  # r5 = horizontal 5-OR of the erosion
        row = er[y]
        o = r5[y]
        for x in range(2, w - 2):
            o[x] = row[x - 2] | row[x - 1] | row[x] | row[x + 1] | row[x + 2]
        for x in range(min(2, w)):
            o[x] = _or5_edge(row, x, w)
        for x in range(max(w - 2, 2), w):
            o[x] = _or5_edge(row, x, w)
    for y in range(h):
        a = r5[y - 1] if y > 0 else zeros
        b = r5[y]
        c = r5[y + 1] if y < h - 1 else zeros
        d = er[y - 2] if y > 1 else zeros
        e = er[y + 2] if y < h - 2 else zeros
        o = out[y]
        for x in range(w):
            o[x] = a[x] | b[x] | c[x] | d[x] | e[x]


# ------------------------------------------------------------------------------ Sobel and energy


@njit(cache=True, nogil=True, fastmath=True)
def _fold_acc(ot, kj, sa, sb, anti, n):
    """``ot[t] += kj * (sa[t] -+ sb[t])`` for t < n (zero-based views keep the loop vectorisable)."""
    if anti:
        for t in range(n):
            ot[t] += kj * (sa[t] - sb[t])
    else:
        for t in range(n):
            ot[t] += kj * (sa[t] + sb[t])


@njit(cache=True, nogil=True, fastmath=True)
def _corr_row(src, k, anti, out):
    """``out[x] = sum_j k[j] * src[reflect101(x + j - r)]`` for a symmetric (``anti`` False) or
    antisymmetric kernel, folded on its centre."""
    wd = src.shape[0]
    kk = k.shape[0]
    r = kk // 2
    lo = min(r, wd)
    hi = max(wd - r, lo)
    n = hi - lo
    kc = k[r]
    ot = out[lo:hi]
    sc = src[lo:hi]
    for t in range(n):
        ot[t] = kc * sc[t]
    for j in range(r):
        _fold_acc(ot, k[j], src[j : j + n], src[2 * r - j : 2 * r - j + n], anti, n)
    for x in range(0, lo):
        acc = np.float32(0.0)
        for j in range(kk):
            acc += k[j] * src[_reflect101(x + j - r, wd)]
        out[x] = acc
    for x in range(hi, wd):
        acc = np.float32(0.0)
        for j in range(kk):
            acc += k[j] * src[_reflect101(x + j - r, wd)]
        out[x] = acc


@njit(cache=True, nogil=True, fastmath=True)
def _corr_col(src, y, k, anti, out):
    """``out[x] = sum_j k[j] * src[reflect101(y + j - r), x]`` (see :func:`_corr_row`)."""
    h, wd = src.shape
    r = k.shape[0] // 2
    kc = k[r]
    c = src[y]
    for x in range(wd):
        out[x] = kc * c[x]
    for j in range(r):
        _fold_acc(out, k[j], src[_reflect101(y + j - r, h)], src[_reflect101(y + r - j, h)], anti, wd)


@njit(cache=True, nogil=True)
def _sobel_pass1(hmap, vmap, deriv, smooth, th, tv, y):
    _corr_row(hmap[y], deriv, True, th[y])
    _corr_row(vmap[y], smooth, False, tv[y])


@njit(cache=True, nogil=True)
def _sobel_pass2(th, tv, deriv, smooth, sob_h, sob_v, rowmm, y):
    _corr_col(th, y, smooth, False, sob_h[y])
    _corr_col(tv, y, deriv, True, sob_v[y])
    a = sob_h[y]
    b = sob_v[y]
    amin = np.inf
    amax = -np.inf
    bmin = np.inf
    bmax = -np.inf
    for x in range(a.shape[0]):
        if a[x] < amin:
            amin = a[x]
        if a[x] > amax:
            amax = a[x]
        if b[x] < bmin:
            bmin = b[x]
        if b[x] > bmax:
            bmax = b[x]
    rowmm[y, 0] = amin
    rowmm[y, 1] = amax
    rowmm[y, 2] = bmin
    rowmm[y, 3] = bmax


@njit(cache=True, nogil=True)
def _norm_range(rowmm, rng, h, mode):
    """Tile-wide Sobel range (measured when ``rng[4] != 0`` and written back, else ``rng[:4]``) ->
    (h_min, 1 / (h_max - h_min), v_min, 1 / (v_max - v_min)); a flat map scales by 0 (OpenCV NORM_MINMAX).
    Unused (zeros) in ``optimus`` mode."""
    if mode != MODE_HOVERNET:
        return 0.0, 0.0, 0.0, 0.0
    if rng[4] != 0.0:
        hmin = np.inf
        hmax = -np.inf
        vmin = np.inf
        vmax = -np.inf
        for y in range(h):
            hmin = min(hmin, rowmm[y, 0])
            hmax = max(hmax, rowmm[y, 1])
            vmin = min(vmin, rowmm[y, 2])
            vmax = max(vmax, rowmm[y, 3])
        rng[0] = hmin
        rng[1] = hmax
        rng[2] = vmin
        rng[3] = vmax
    hmin, hmax, vmin, vmax = rng[0], rng[1], rng[2], rng[3]
    sh = 1.0 / (hmax - hmin) if hmax - hmin > 2.220446049250313e-16 else 0.0
    sv = 1.0 / (vmax - vmin) if vmax - vmin > 2.220446049250313e-16 else 0.0
    return hmin, sh, vmin, sv


@njit(cache=True, nogil=True, fastmath=True)
def _energy_row(sob_h, sob_v, comp, mode, thr, slope, hmin, sh, vmin, sv, e, marker0, y):
    """Row ``y`` of the pre-blur relief ``e`` and the marker seeds ``marker0`` (see the module doc)."""
    a_ = sob_h[y]
    b_ = sob_v[y]
    c_ = comp[y]
    er = e[y]
    mr = marker0[y]
    if mode == MODE_HOVERNET:
        for x in range(a_.shape[0]):
            if c_[x] == 0:
                er[x] = 0.0
                mr[x] = 0
                continue
            a = 1.0 - (a_[x] - hmin) * sh
            b = 1.0 - (b_[x] - vmin) * sv
            o = a if a > b else b
            if o < 0.0:
                o = 0.0
            er[x] = 1.0 - o
            mr[x] = 1 if o < thr else 0
    else:
        for x in range(a_.shape[0]):
            a = a_[x]
            b = b_[x]
            er[x] = -a if a < b else -b
            mr[x] = 1 if (c_[x] != 0 and a > slope and b > slope) else 0


@njit(cache=True, nogil=True, fastmath=True)
def _blur_row(src, comp, sign, out, y):
    """``out[y, x] = sign * gaussian3x3(src)`` (OpenCV's [1, 2, 1] / 4, reflect-101) where ``comp > 0``."""
    h, w = src.shape
    r0 = src[_reflect101(y - 1, h)]
    r1 = src[y]
    r2 = src[_reflect101(y + 1, h)]
    c_ = comp[y]
    o = out[y]
    for x in range(w):
        if c_[x] == 0:
            continue
        x0 = _reflect101(x - 1, w)
        x2 = _reflect101(x + 1, w)
        a = r0[x0] + 2.0 * r0[x] + r0[x2]
        b = r1[x0] + 2.0 * r1[x] + r1[x2]
        c = r2[x0] + 2.0 * r2[x] + r2[x2]
        o[x] = sign * (a + 2.0 * b + c) * 0.0625


# ------------------------------------------------------------------------------------- watershed


@njit(cache=True, nogil=True)
def _ws_prepare(cs, ce, crow, clab, ncomp, me, my, mlab, nmr, nmark, comp, keep_unmarked, out, order):
    """Label the foreground components that need no flood and list those that do.

    A component with one marker label is that label (what the flood gives), one without stays 0
    (labels ``nmark + 1, ...`` in component order with ``keep_unmarked``), exactly as the global
    flood. Writes ``out`` (every pixel) and, for the j-th component holding >= 2 markers, its runs
    (in raster order) into ``order[ostart[j]:ostart[j + 1]]``; its heap lives at
    ``heap_base[j]:heap_base[j + 1]`` (its area). Returns ``(nlab, nmulti, ostart, heap_base)``.
    """
    mcomp = np.zeros(nmark + 1, np.int32)
    for i in range(nmr):  # marker -> component of its last pixel in raster order
        m = mlab[i]
        if m > 0:
            mcomp[m] = comp[my[i], me[i] - 1]
    nm = np.zeros(ncomp + 1, np.int32)
    single = np.zeros(ncomp + 1, np.int32)
    for m in range(1, nmark + 1):
        c = mcomp[m]
        if c > 0:
            nm[c] += 1
            single[c] = m
    nlab = nmark
    nmulti = 0
    for c in range(ncomp + 1):
        if nm[c] != 1:
            single[c] = 0
        if keep_unmarked and c > 0 and nm[c] == 0:
            nlab += 1
            single[c] = nlab
        if nm[c] > 1:
            nmulti += 1
    ncr = crow[crow.shape[0] - 1]
    _paint_runs(cs, ce, crow, clab, single, out)
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
        s = slot[clab[i]] if clab[i] > 0 else -1
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
        s = slot[clab[i]] if clab[i] > 0 else -1
        if s >= 0:
            order[fill[s]] = i
            fill[s] += 1
    return nlab, nmulti, ostart, heap_base


@njit(cache=True, nogil=True, inline="always")
def _hpush(heap, size, key):
    i = size
    while i > 0:
        parent = (i - 1) >> 1
        pk = heap[parent]
        if key < pk:
            heap[i] = pk
            i = parent
        else:
            break
    heap[i] = key
    return size + 1


@njit(cache=True, nogil=True, inline="always")
def _hpop(heap, size):
    top = heap[0]
    size -= 1
    key = heap[size]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        ck = heap[c]
        if c + 1 < size and heap[c + 1] < ck:
            c += 1
            ck = heap[c]
        if ck < key:
            heap[i] = ck
            i = c
        else:
            break
    if size > 0:
        heap[i] = key
    return top, size


@njit(cache=True, nogil=True)
def _flood(s, order, ostart, heap_base, cs, ce, cy, markers, comp, bits, out, keys, idx):
    """Priority flood (4-connected, ties first-in first-out) of one component from its markers.

    Heap entries are single int64 keys ``relief << 32 | insertion number``; the pixel of insertion
    ``a`` is ``pix[a]`` (a component inserts each pixel at most once, so both fit its area)."""
    h, w = out.shape
    k = keys[heap_base[s] : heap_base[s + 1]]
    pix = idx[heap_base[s] : heap_base[s + 1]]
    for t in range(ostart[s], ostart[s + 1]):
        i = order[t]
        y = cy[i]
        for x in range(cs[i], ce[i]):
            m = markers[y, x]
            if m > 0:
                out[y, x] = m
    # seeds in raster order; a seed without an unlabelled component neighbour would pop without
    # effect, so it is not queued (the relative order of all other insertions is unchanged)
    size = 0
    age = 0
    for t in range(ostart[s], ostart[s + 1]):
        i = order[t]
        y = cy[i]
        for x in range(cs[i], ce[i]):
            if markers[y, x] <= 0:
                continue
            if (
                (y > 0 and out[y - 1, x] == 0 and comp[y - 1, x] != 0)
                or (y < h - 1 and out[y + 1, x] == 0 and comp[y + 1, x] != 0)
                or (x > 0 and out[y, x - 1] == 0 and comp[y, x - 1] != 0)
                or (x < w - 1 and out[y, x + 1] == 0 and comp[y, x + 1] != 0)
            ):
                pix[age] = y * w + x
                size = _hpush(k, size, (_sortable(bits[y, x]) << 32) | age)
                age += 1
    while size > 0:
        top, size = _hpop(k, size)
        p = pix[top & 0xFFFFFFFF]
        y = p // w
        x = p - y * w
        lab = out[y, x]
        for t in range(4):
            if t == 0:
                if y == 0:
                    continue
                q = p - w
            elif t == 1:
                if y == h - 1:
                    continue
                q = p + w
            elif t == 2:
                if x == 0:
                    continue
                q = p - 1
            else:
                if x == w - 1:
                    continue
                q = p + 1
            qy = q // w
            qx = q - qy * w
            if out[qy, qx] != 0 or comp[qy, qx] == 0:
                continue
            out[qy, qx] = lab
            pix[age] = q
            size = _hpush(k, size, (_sortable(bits[qy, qx]) << 32) | age)
            age += 1


# ------------------------------------------------------------------------------------- pipeline


def hv_workspace(h: int, w: int, n: int = 0) -> tuple:
    """Scratch arrays for one (h, w) tile, or with ``n > 0`` for ``n`` threads of :func:`hv_batch`
    (leading axis ``n``). Kept by the caller across calls: first-touch page faults of fresh buffers
    would cost as much as the work on a 1024 px tile."""
    lead = (n,) if n > 0 else ()
    runs = h * ((w + 1) // 2) + 1
    hw = h * w + 1
    i32r = lambda: np.empty((*lead, runs), np.int32)  # noqa: E731
    return (
        i32r(), i32r(), i32r(), np.empty((*lead, h + 1), np.int64), i32r(),  # 0-4 component runs + labels
        i32r(), i32r(), i32r(), np.empty((*lead, h + 1), np.int64), i32r(),  # 5-9 scratch runs + labels
        i32r(),  # 10 union-find parents
        np.empty((*lead, h, w), np.int32),  # 11 components
        np.empty((*lead, h, w), np.int32),  # 12 markers
        np.empty((*lead, h, w), np.uint8),  # 13 marker seeds
        np.empty((*lead, h, w), np.uint8),  # 14 filled
        np.empty((*lead, h, w), np.uint8),  # 15 morphology scratch
        np.empty((*lead, h, w), np.uint8),  # 16 morphology scratch
        np.empty((*lead, h, w), np.float32),  # 17 row-pass H / energy
        np.empty((*lead, h, w), np.float32),  # 18 row-pass V / relief
        np.empty((*lead, h, w), np.float32),  # 19 Sobel H
        np.empty((*lead, h, w), np.float32),  # 20 Sobel V
        np.empty((*lead, h, 4), np.float64),  # 21 per-row Sobel min / max
        np.empty((*lead, hw), np.int64),  # 22 heap keys
        np.empty((*lead, hw), np.int64),  # 23 heap payload
        i32r(),  # 24 flood run order
    )


@njit(cache=True, nogil=True)
def _ws_view(ws, t):
    return (
        ws[0][t], ws[1][t], ws[2][t], ws[3][t], ws[4][t], ws[5][t], ws[6][t], ws[7][t], ws[8][t], ws[9][t],
        ws[10][t], ws[11][t], ws[12][t], ws[13][t], ws[14][t], ws[15][t], ws[16][t], ws[17][t], ws[18][t],
        ws[19][t], ws[20][t], ws[21][t], ws[22][t], ws[23][t], ws[24][t],
    )


@njit(cache=True, nogil=True)
def _stage_components(np_prob, np_thr, min_obj, ws):
    cs, ce, cy, crow, clab = ws[0], ws[1], ws[2], ws[3], ws[4]
    parent = ws[10]
    comp = ws[11]
    h = np_prob.shape[0]
    n = _scan_prob_runs(np_prob, np_thr, cs, ce, cy, crow)
    _union_runs(cs, ce, crow, h, parent)
    ncomp = _number_runs(cs, ce, n, parent, min_obj, clab)
    _paint_runs(cs, ce, crow, clab, _identity_lut(ncomp), comp)
    return ncomp


@njit(cache=True, nogil=True)
def _stage_markers(mode, min_marker, ws):
    ms, me, my, mrow, mlab = ws[5], ws[6], ws[7], ws[8], ws[9]
    parent = ws[10]
    markers, marker0, filled, t1, t2 = ws[12], ws[13], ws[14], ws[15], ws[16]
    h = marker0.shape[0]
    _fill_holes(marker0, filled, ms, me, my, mrow, parent)
    if mode == MODE_HOVERNET:
        _open_ellipse5(filled, t1, t2, marker0)
        seeds = marker0
    else:
        seeds = filled
    n = _scan_runs(seeds, True, ms, me, my, mrow)
    _union_runs(ms, me, mrow, h, parent)
    nmark = _number_runs(ms, me, n, parent, min_marker, mlab)
    _paint_runs(ms, me, mrow, mlab, _identity_lut(nmark), markers)
    return nmark, n


@njit(cache=True, nogil=True)
def _stage_front(np_prob, hmap, vmap, np_thr, min_obj, deriv, smooth, ws):
    """Components and the row pass of the Sobel; returns the component count."""
    ncomp = _stage_components(np_prob, np_thr, min_obj, ws)
    for y in range(np_prob.shape[0]):
        _sobel_pass1(hmap, vmap, deriv, smooth, ws[17], ws[18], y)
    return ncomp


@njit(cache=True, nogil=True)
def _stage_watershed_prepare(ncomp, nmark, nmr, keep_unmarked, ws, inst):
    if ncomp == 0 or (nmark == 0 and not keep_unmarked):
        inst[:] = 0
        return 0, 0, np.zeros(1, np.int64), np.zeros(1, np.int64)
    return _ws_prepare(
        ws[0], ws[1], ws[3], ws[4], ncomp, ws[6], ws[7], ws[9], nmr, nmark, ws[11], keep_unmarked, inst, ws[24]
    )


@njit(cache=True, nogil=True)
def hv_tile(np_prob, hmap, vmap, np_thr, min_obj, deriv, smooth, mode, marker_thr, slope, min_marker, keep_unmarked, rng, ws, inst):
    """The whole pipeline on one tile, single-threaded (the unit of :func:`hv_batch`).

    ``np_prob`` (H, W) float, ``hmap``/``vmap`` (H, W) float32, ``deriv``/``smooth`` float32 Sobel
    kernels, ``mode`` 0 hovernet / 1 optimus, ``rng`` (5,) float64 Sobel range (h min, h max, v min,
    v max, measure flag; measured and written back when the flag is set; ``hovernet`` mode only),
    ``ws`` from :func:`hv_workspace`. Writes ``inst`` (H, W) int32 (ids 1..n), returns n.
    """
    h = np_prob.shape[0]
    ncomp = _stage_front(np_prob, hmap, vmap, np_thr, min_obj, deriv, smooth, ws)
    comp, th, tv, sob_h, sob_v, rowmm = ws[11], ws[17], ws[18], ws[19], ws[20], ws[21]
    for y in range(h):
        _sobel_pass2(th, tv, deriv, smooth, sob_h, sob_v, rowmm, y)
    hmin, sh, vmin, sv = _norm_range(rowmm, rng, h, mode)
    for y in range(h):
        _energy_row(sob_h, sob_v, comp, mode, marker_thr, slope, hmin, sh, vmin, sv, th, ws[13], y)
    sign = -1.0 if mode == MODE_HOVERNET else 1.0
    for y in range(h):
        _blur_row(th, comp, sign, tv, y)
    nmark, nmr = _stage_markers(mode, min_marker, ws)
    nlab, nmulti, ostart, heap_base = _stage_watershed_prepare(ncomp, nmark, nmr, keep_unmarked, ws, inst)
    bits = tv.view(np.int32)
    for s in range(nmulti):
        _flood(s, ws[24], ostart, heap_base, ws[0], ws[1], ws[2], ws[12], comp, bits, inst, ws[22], ws[23])
    return nlab


@njit(cache=True, nogil=True, parallel=True)
def hv_batch(np_prob, hv, np_thr, min_obj, deriv, smooth, mode, marker_thr, slope, min_marker, keep_unmarked, rng, ws, inst, counts):
    """:func:`hv_tile` on ``B`` tiles, tiles spread over threads (one workspace per thread).

    ``np_prob`` (B, H, W), ``hv`` (B, 2, H, W) float32, ``rng`` (B, 5), ``ws`` from
    :func:`hv_workspace` with ``n`` >= the number of threads, ``inst`` (B, H, W) int32, ``counts`` (B,)
    int64 receives each tile's instance count.
    """
    for b in prange(np_prob.shape[0]):
        t = get_thread_id()
        counts[b] = hv_tile(
            np_prob[b], hv[b, 0], hv[b, 1], np_thr, min_obj, deriv, smooth, mode, marker_thr, slope,
            min_marker, keep_unmarked, rng[b], _ws_view(ws, t), inst[b],
        )
