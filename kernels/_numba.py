"""Numba primitives shared by the HV post-processing, the target generator and the stitcher.

Every kernel is a module-level ``@njit(cache=True)`` function working on arrays allocated by its
caller (the Python wrappers in :mod:`.hovernet` / :mod:`.targets` validate and allocate). Image
arrays are C-contiguous (H, W); pixel (row y, column x). Neighbourhoods are 4-connected throughout,
as in scipy's ``ndimage.label`` default and skimage's ``watershed(connectivity=1)``.

Borders follow OpenCV's default ``BORDER_REFLECT_101`` (scipy ``mode="mirror"``) for the linear
filters, and the morphology border rules of OpenCV (erosion treats the outside as foreground,
dilation as background), so the results line up with HoVer-Net's OpenCV-based code.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# ----------------------------------------------------------------------------------------- kernels


def sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's Sobel kernels of odd size ``ksize`` (``cv2.getDerivKernels``, unnormalised).

    Returns ``(deriv, smooth)``, float64 of length ``ksize``: ``smooth`` is the binomial row of order
    ``ksize - 1``; ``deriv`` is the binomial of order ``ksize - 2`` convolved with ``[-1, 0, 1]``'s
    difference step, oriented so that ``sum(deriv[k] * f[x + k - r])`` is ``+`` for increasing ``f``.
    """
    if ksize < 3 or ksize % 2 == 0:
        raise ValueError(f"sobel ksize={ksize} must be odd and >= 3")
    smooth = np.array([1.0])
    for _ in range(ksize - 1):
        smooth = np.convolve(smooth, [1.0, 1.0])
    deriv = np.array([1.0])
    for _ in range(ksize - 2):
        deriv = np.convolve(deriv, [1.0, 1.0])
    deriv = np.convolve(deriv, [1.0, -1.0])  # np.convolve flips: correlation weights become [-1, +1]
    return deriv[::-1].copy(), smooth


@njit(cache=True, inline="always")
def _reflect101(i: int, n: int) -> int:
    if n == 1:
        return 0
    while i < 0 or i >= n:
        if i < 0:
            i = -i
        if i >= n:
            i = 2 * n - 2 - i
    return i


@njit(cache=True, fastmath=True)
def correlate_rows(src, w, out):
    """out[y, x] = sum_k w[k] * src[y, reflect101(x + k - r)]; (H, W) float, w (K,) odd K."""
    h, wd = src.shape
    k = w.shape[0]
    r = k // 2
    buf = np.empty(wd + 2 * r, out.dtype)
    acc = np.empty(wd, out.dtype)
    for y in range(h):
        for i in range(wd + 2 * r):
            buf[i] = src[y, _reflect101(i - r, wd)]
        acc[:] = 0
        for j in range(k):
            wj = w[j]
            for x in range(wd):
                acc[x] += wj * buf[x + j]
        out[y, :] = acc


@njit(cache=True, fastmath=True)
def correlate_cols(src, w, out):
    """out[y, x] = sum_k w[k] * src[reflect101(y + k - r), x]; (H, W) float, w (K,) odd K."""
    h, wd = src.shape
    k = w.shape[0]
    r = k // 2
    acc = np.empty(wd, out.dtype)
    for y in range(h):
        acc[:] = 0
        for j in range(k):
            yy = _reflect101(y + j - r, h)
            wj = w[j]
            for x in range(wd):
                acc[x] += wj * src[yy, x]
        out[y, :] = acc


@njit(cache=True)
def minmax(a):
    """(min, max) of a 2-D float array."""
    mn = np.inf
    mx = -np.inf
    for v in a.ravel():
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    return mn, mx


# ----------------------------------------------------------------------------- connected components


@njit(cache=True, inline="always")
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True)
def label_equal(src, out, queue):
    """4-connected components of equal non-zero values of ``src``; returns their number.

    ``out`` (H, W) int32 receives 1..n in raster order of each component's first pixel; ``queue`` is
    an int64 scratch array of at least H*W/2 + 2 entries (union-find parents). A binary mask gives
    plain connected-component labelling; an instance map gives each connected piece of each instance
    its own label. Two-pass union-find.
    """
    h, w = src.shape
    parent = queue
    nprov = 0
    for y in range(h):
        for x in range(w):
            v = src[y, x]
            if v == 0:
                out[y, x] = 0
                continue
            up = out[y - 1, x] if (y > 0 and src[y - 1, x] == v) else 0
            left = out[y, x - 1] if (x > 0 and src[y, x - 1] == v) else 0
            if up == 0 and left == 0:
                nprov += 1
                parent[nprov] = nprov
                out[y, x] = nprov
            elif up == 0:
                out[y, x] = left
            elif left == 0 or left == up:
                out[y, x] = up
            else:
                ru = _find(parent, up)
                rl = _find(parent, left)
                if ru < rl:
                    parent[rl] = ru
                elif rl < ru:
                    parent[ru] = rl
                out[y, x] = up
    # final ids in raster order of first pixel: roots are the smallest provisional id of their set,
    # and provisional ids are issued in raster order, so numbering roots in increasing order works
    final = np.zeros(nprov + 1, np.int32)
    n = 0
    for i in range(1, nprov + 1):
        r = _find(parent, i)
        if r == i:
            n += 1
            final[i] = n
        else:
            final[i] = final[r]
    for y in range(h):
        for x in range(w):
            out[y, x] = final[out[y, x]]
    return n


@njit(cache=True)
def remove_small_relabel(labels, n, min_size):
    """Zero the labels with fewer than ``min_size`` pixels and renumber the rest 1..m in order; returns m."""
    sizes = np.zeros(n + 1, np.int64)
    for v in labels.ravel():
        sizes[v] += 1
    lut = np.zeros(n + 1, np.int32)
    m = 0
    for i in range(1, n + 1):
        if sizes[i] >= min_size:
            m += 1
            lut[i] = m
    if m == n:
        return m
    h, w = labels.shape
    for y in range(h):
        for x in range(w):
            labels[y, x] = lut[labels[y, x]]
    return m


# ------------------------------------------------------------------------------------- morphology


@njit(cache=True)
def fill_holes(mask, out, queue, bg, lab):
    """Binary hole filling (scipy ``binary_fill_holes`` default): background not 4-connected to the
    image border becomes foreground. ``mask``/``out`` (H, W) uint8; scratch: ``queue`` int64 of
    H*W + 2, ``bg`` (H, W) uint8, ``lab`` (H, W) int32.

    Labels the background's 4-connected components (union-find, :func:`label_equal`) and keeps as
    background only those touching the border.
    """
    h, w = mask.shape
    for y in range(h):
        for x in range(w):
            bg[y, x] = 0 if mask[y, x] else 1
    n = label_equal(bg, lab, queue)
    border = np.zeros(n + 1, np.uint8)
    for x in range(w):
        border[lab[0, x]] = 1
        border[lab[h - 1, x]] = 1
    for y in range(h):
        border[lab[y, 0]] = 1
        border[lab[y, w - 1]] = 1
    for y in range(h):
        for x in range(w):
            lv = lab[y, x]
            out[y, x] = 0 if (lv > 0 and border[lv]) else 1


@njit(cache=True)
def open_ellipse5(mask, tmp, out):
    """Binary opening with OpenCV's 5x5 ellipse (rows ±2: centre column only; rows -1..1: 5 wide).

    Erosion treats outside pixels as foreground and dilation as background (OpenCV defaults).
    ``mask``, ``tmp``, ``out`` (H, W) uint8. Work is proportional to the foreground: the erosion is
    evaluated on mask pixels only and the dilation scatters from the eroded pixels.
    """
    h, w = mask.shape
    for y in range(h):
        for x in range(w):
            ok = 0
            if mask[y, x]:
                ok = 1
                for dy in range(-2, 3):
                    yy = y + dy
                    if yy < 0 or yy >= h:
                        continue
                    if dy == -2 or dy == 2:
                        if mask[yy, x] == 0:
                            ok = 0
                            break
                    else:
                        for dx in range(-2, 3):
                            xx = x + dx
                            if xx >= 0 and xx < w and mask[yy, xx] == 0:
                                ok = 0
                                break
                        if ok == 0:
                            break
            tmp[y, x] = ok
    out[:] = 0
    for y in range(h):
        for x in range(w):
            if tmp[y, x] == 0:
                continue
            for dy in range(-2, 3):
                yy = y + dy
                if yy < 0 or yy >= h:
                    continue
                if dy == -2 or dy == 2:
                    out[yy, x] = 1
                else:
                    for xx in range(max(x - 2, 0), min(x + 3, w)):
                        out[yy, xx] = 1


# --------------------------------------------------------------------------------------- watershed


@njit(cache=True, inline="always")
def _sortable(bits):
    """float32 bit pattern (as int32) -> int64 with the float's order (sign-magnitude to two's complement)."""
    b = np.int64(bits)
    if b < 0:
        b = -(b & 0x7FFFFFFF) - 1
    return b


@njit(cache=True)
def _heap_push(keys, idx, size, key, p):
    i = size
    while i > 0:
        parent = (i - 1) >> 1
        if key < keys[parent]:
            keys[i] = keys[parent]
            idx[i] = idx[parent]
            i = parent
        else:
            break
    keys[i] = key
    idx[i] = p
    return size + 1


@njit(cache=True)
def _heap_pop(keys, idx, size):
    top = idx[0]
    size -= 1
    key = keys[size]
    p = idx[size]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and keys[c + 1] < keys[c]:
            c += 1
        if keys[c] < key:
            keys[i] = keys[c]
            idx[i] = idx[c]
            i = c
        else:
            break
    if size > 0:
        keys[i] = key
        idx[i] = p
    return top, size


@njit(cache=True)
def watershed_by_component(image, markers, nmark, comp, ncomp, out, keys, idx, keep_unmarked):
    """Marker-controlled watershed (4-connected priority flood, ties first-in first-out) inside a mask.

    The mask is given as its 4-connected component labels ``comp`` (1..ncomp). A flood cannot cross
    between mask components: a component holding a single marker label is that label entirely (what
    the flood would give), one without marker stays 0 (as in skimage), and only the components with
    two or more markers are flooded, with one binary heap keyed on (relief, insertion order).

    Parameters
    ----------
    image : (H, W) float32
        Relief (low values flood first); read on mask pixels only.
    markers : (H, W) int32
        Seed labels 1..nmark (0 none); seeds outside the mask are ignored.
    comp : (H, W) int32
        Mask components.
    out : (H, W) int32
        Receives the labels.
    keys, idx : (>= H*W,) int64
        Heap scratch.
    keep_unmarked : bool
        Give mask components without any marker labels of their own (nmark+1, ...) instead of 0.

    Returns
    -------
    int
        The number of labels (``nmark`` plus the unmarked components kept).
    """
    h, w = image.shape
    bits = image.view(np.int32)
    mcomp = np.zeros(nmark + 1, np.int32)
    for y in range(h):
        for x in range(w):
            m = markers[y, x]
            if m > 0:
                mcomp[m] = comp[y, x]
    nm = np.zeros(ncomp + 1, np.int32)
    single = np.zeros(ncomp + 1, np.int32)
    for m in range(1, nmark + 1):
        c = mcomp[m]
        if c > 0:
            nm[c] += 1
            single[c] = m
    nlab = nmark
    for c in range(ncomp + 1):
        if nm[c] != 1:
            single[c] = 0
        if keep_unmarked and c > 0 and nm[c] == 0:
            nlab += 1
            single[c] = nlab
    nmulti = 0
    for y in range(h):
        for x in range(w):
            c = comp[y, x]
            out[y, x] = single[c]
            if nm[c] > 1:
                nmulti += 1
    if nmulti == 0:
        return nlab
    size = 0
    age = 0
    for y in range(h):
        for x in range(w):
            m = markers[y, x]
            if m > 0 and nm[comp[y, x]] > 1:
                out[y, x] = m
                size = _heap_push(keys, idx, size, (_sortable(bits[y, x]) << 32) | age, y * w + x)
                age += 1
    while size > 0:
        p, size = _heap_pop(keys, idx, size)
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
            size = _heap_push(keys, idx, size, (_sortable(bits[qy, qx]) << 32) | age, q)
            age += 1
    return nlab


# ------------------------------------------------------------------------------ instance properties


@njit(cache=True)
def instance_moments(inst, n):
    """Per-instance area, pixel sums and bounding boxes of an (H, W) int32 map with ids 1..n.

    Returns ``area (n,) int64``, ``sum_x, sum_y (n,) float64``, ``bbox (n, 4) int32`` as
    ``x0, y0, x1, y1`` (half-open).
    """
    h, w = inst.shape
    area = np.zeros(n, np.int64)
    sx = np.zeros(n, np.float64)
    sy = np.zeros(n, np.float64)
    bbox = np.empty((n, 4), np.int32)
    bbox[:, 0] = w
    bbox[:, 1] = h
    bbox[:, 2] = 0
    bbox[:, 3] = 0
    for y in range(h):
        for x in range(w):
            v = inst[y, x]
            if v <= 0:
                continue
            i = v - 1
            area[i] += 1
            sx[i] += x
            sy[i] += y
            if x < bbox[i, 0]:
                bbox[i, 0] = x
            if y < bbox[i, 1]:
                bbox[i, 1] = y
            if x + 1 > bbox[i, 2]:
                bbox[i, 2] = x + 1
            if y + 1 > bbox[i, 3]:
                bbox[i, 3] = y + 1
    return area, sx, sy, bbox


@njit(cache=True)
def instance_type_votes(inst, n, type_prob):
    """Per-instance argmax-class pixel counts and summed class probabilities.

    ``type_prob`` (C, H, W) float32; returns ``votes (n, C) int64`` and ``score_sum (n, C) float64``.
    """
    c_n, h, w = type_prob.shape
    votes = np.zeros((n, c_n), np.int64)
    ssum = np.zeros((n, c_n), np.float64)
    for y in range(h):
        for x in range(w):
            v = inst[y, x]
            if v <= 0:
                continue
            i = v - 1
            best = 0
            bv = type_prob[0, y, x]
            for c in range(c_n):
                pv = type_prob[c, y, x]
                ssum[i, c] += pv
                if pv > bv:
                    bv = pv
                    best = c
            votes[i, best] += 1
    return votes, ssum


# -------------------------------------------------------------------------------- contour tracing

# direction d: 0 east, 1 south, 2 west, 3 north (image coordinates, y down)
_DX = np.array([1, 0, -1, 0], np.int64)
_DY = np.array([0, 1, 0, -1], np.int64)
# pixel ahead-right / ahead-left of vertex (x, y) when moving in direction d (region on the right)
_RX = np.array([0, -1, -1, 0], np.int64)
_RY = np.array([0, 0, -1, -1], np.int64)
_LX = np.array([0, 0, -1, -1], np.int64)
_LY = np.array([-1, 0, 0, -1], np.int64)


@njit(cache=True, inline="always")
def _inside(inst, x, y, v):
    h, w = inst.shape
    return x >= 0 and y >= 0 and x < w and y < h and inst[y, x] == v


@njit(cache=True)
def _trace(inst, v, sx, sy, eps, buf, write):
    """Crack-following trace of the outer boundary of the 4-connected piece holding pixel (sx, sy),
    its top-left-most pixel. Vertices at pixel corners; a corner where the region touches itself
    diagonally is cut by ``eps`` on each pass so the ring stays simple. Returns the vertex count
    (the first vertex is repeated at the end when writing)."""
    dxs = _DX
    dys = _DY
    x = sx
    y = sy
    d = 3
    k = 0
    first = True
    while True:
        if not first and x == sx and y == sy and d == 3:
            break
        first = False
        r_in = _inside(inst, x + _RX[d], y + _RY[d], v)
        l_in = _inside(inst, x + _LX[d], y + _LY[d], v)
        if r_in:
            nd = (d + 3) % 4 if l_in else d
        else:
            nd = (d + 1) % 4
        if nd != d:
            if (not r_in) and l_in:
                if write:
                    buf[k, 0] = x - eps * dxs[d]
                    buf[k, 1] = y - eps * dys[d]
                    buf[k + 1, 0] = x + eps * dxs[nd]
                    buf[k + 1, 1] = y + eps * dys[nd]
                k += 2
            else:
                if write:
                    buf[k, 0] = x
                    buf[k, 1] = y
                k += 1
        x += dxs[nd]
        y += dys[nd]
        d = nd
    if write:
        buf[k, 0] = buf[0, 0]
        buf[k, 1] = buf[0, 1]
    return k + 1


@njit(cache=True)
def _start_pixel(inst, v, bx0, by0, bx1):
    for x in range(bx0, bx1):
        if inst[by0, x] == v:
            return x
    return -1


@njit(cache=True)
def trace_contours(inst, bbox, eps):
    """Outer contours of instances 1..n (``bbox`` (n, 4) x0, y0, x1, y1) as one flat buffer.

    Returns ``coords (M, 2) float64`` in (x, y) pixel-corner coordinates (pixel (y, x) spans
    [x, x+1] x [y, y+1]) and ``offsets (n + 1,) int64``; instance i's closed ring is
    ``coords[offsets[i]:offsets[i+1]]``.
    """
    n = bbox.shape[0]
    counts = np.zeros(n, np.int64)
    dummy = np.empty((1, 2), np.float64)
    for i in range(n):
        sx = _start_pixel(inst, i + 1, bbox[i, 0], bbox[i, 1], bbox[i, 2])
        if sx >= 0:
            counts[i] = _trace(inst, i + 1, sx, bbox[i, 1], eps, dummy, False)
    offsets = np.zeros(n + 1, np.int64)
    for i in range(n):
        offsets[i + 1] = offsets[i] + counts[i]
    coords = np.empty((offsets[n], 2), np.float64)
    for i in range(n):
        if counts[i] > 0:
            sx = _start_pixel(inst, i + 1, bbox[i, 0], bbox[i, 1], bbox[i, 2])
            _trace(inst, i + 1, sx, bbox[i, 1], eps, coords[offsets[i] : offsets[i + 1]], True)
    return coords, offsets


# ------------------------------------------------------------------------------- fused HV pipeline


@njit(cache=True, fastmath=True)
def _energy(sob_h, sob_v, blb, thr, dist0, marker0, rng):
    """dist0 = blb * (1 - overall), marker0 = blb & (overall < thr), with
    overall = max(1 - minmax_norm(sob_h), 1 - minmax_norm(sob_v)) (norms over the whole tile)."""
    h, w = sob_h.shape
    if rng[4] != 0.0:  # measure (a flag, not NaN: fastmath assumes no NaNs)
        hmin, hmax = minmax(sob_h)
        vmin, vmax = minmax(sob_v)
        rng[0] = hmin
        rng[1] = hmax
        rng[2] = vmin
        rng[3] = vmax
    else:
        hmin, hmax, vmin, vmax = rng[0], rng[1], rng[2], rng[3]
    # OpenCV NORM_MINMAX maps a constant image to alpha (0)
    sh = 1.0 / (hmax - hmin) if hmax - hmin > 2.220446049250313e-16 else 0.0
    sv = 1.0 / (vmax - vmin) if vmax - vmin > 2.220446049250313e-16 else 0.0
    for y in range(h):
        for x in range(w):
            if blb[y, x] == 0:
                dist0[y, x] = 0.0
                marker0[y, x] = 0
                continue
            a = 1.0 - (sob_h[y, x] - hmin) * sh
            b = 1.0 - (sob_v[y, x] - vmin) * sv
            o = a if a > b else b
            if o < 0.0:
                o = 0.0
            dist0[y, x] = 1.0 - o
            marker0[y, x] = 1 if o < thr else 0


@njit(cache=True, fastmath=True)
def _neg_blur3_masked(src, mask, out):
    """out = -gaussian3x3(src) (OpenCV's [1, 2, 1] / 4 kernel, reflect-101) where mask > 0."""
    h, w = src.shape
    for y in range(h):
        y0 = _reflect101(y - 1, h)
        y2 = _reflect101(y + 1, h)
        for x in range(w):
            if mask[y, x] == 0:
                continue
            x0 = _reflect101(x - 1, w)
            x2 = _reflect101(x + 1, w)
            a = src[y0, x0] + 2.0 * src[y0, x] + src[y0, x2]
            b = src[y, x0] + 2.0 * src[y, x] + src[y, x2]
            c = src[y2, x0] + 2.0 * src[y2, x] + src[y2, x2]
            out[y, x] = -(a + 2.0 * b + c) * 0.0625


def hv_workspace(h: int, w: int) -> tuple:
    """Scratch arrays for :func:`hv_pipeline` on an (h, w) tile (reused across calls: first-touch page
    faults of fresh buffers would otherwise cost as much as the work on a 1024 px tile)."""
    n = h * w + 2
    return (
        np.empty(n, np.int64),
        np.empty(n, np.int64),
        np.empty((h, w), np.uint8),
        np.empty((h, w), np.uint8),
        np.empty((h, w), np.uint8),
        np.empty((h, w), np.int32),
        np.empty((h, w), np.int32),
        np.empty((h, w), np.int32),
        np.empty((h, w), np.float32),
        np.empty((h, w), np.float32),
        np.empty((h, w), np.float32),
    )


@njit(cache=True)
def hv_pipeline(
    np_prob, hmap, vmap, np_thr, min_obj, deriv, smooth, marker_thr, min_marker, keep_unmarked, rng, ws, inst
):
    """HoVer-Net's ``__proc_np_hv`` in one call (see :mod:`cellvit_optimus.kernels.hovernet`).

    ``np_prob`` (H, W) float, ``hmap``/``vmap`` (H, W) float32, ``deriv``/``smooth`` float32 Sobel
    kernels, ``ws`` from :func:`hv_workspace`, ``rng`` Sobel normalisation range
    (h min, h max, v min, v max, measure flag) (5,) float64; with the flag != 0 the range is
    measured on this tile and written back.
    Writes ``inst`` (H, W) int32 (ids 1..n), returns n.
    """
    queue, heap_idx, fg, filled, opened, blb, markers, lab, tmp, sob_h, sob_v = ws
    h, w = np_prob.shape
    for y in range(h):
        for x in range(w):
            fg[y, x] = 1 if np_prob[y, x] >= np_thr else 0
    ncomp = label_equal(fg, blb, queue)
    ncomp = remove_small_relabel(blb, ncomp, min_obj)

    correlate_rows(hmap, deriv, tmp)
    correlate_cols(tmp, smooth, sob_h)
    correlate_cols(vmap, deriv, tmp)
    correlate_rows(tmp, smooth, sob_v)
    marker0 = fg  # reuse
    _energy(sob_h, sob_v, blb, marker_thr, tmp, marker0, rng)
    dist = sob_h
    _neg_blur3_masked(tmp, blb, dist)

    fill_holes(marker0, filled, queue, opened, lab)
    open_ellipse5(filled, marker0, opened)
    nmark = label_equal(opened, markers, queue)
    nmark = remove_small_relabel(markers, nmark, min_marker)

    if ncomp > 0 and (nmark > 0 or keep_unmarked):
        return watershed_by_component(dist, markers, nmark, blb, ncomp, inst, queue, heap_idx, keep_unmarked)
    inst[:] = 0
    return 0
