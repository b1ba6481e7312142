"""Numba primitives shared by the HV post-processing (:mod:`._hvpipe`), the target generator and the stitcher.

Every kernel is a module-level ``@njit(cache=True, nogil=True)`` function working on arrays allocated by its
caller (the Python wrappers in :mod:`.hovernet` / :mod:`.targets` validate and allocate). Image
arrays are C-contiguous (H, W); pixel (row y, column x). Neighbourhoods are 4-connected throughout,
as in scipy's ``ndimage.label`` default and skimage's ``watershed(connectivity=1)``.

Borders follow OpenCV's default ``BORDER_REFLECT_101`` (scipy ``mode="mirror"``) for the linear
filters, and the morphology border rules of OpenCV (erosion treats the outside as foreground,
dilation as background), so the results line up with HoVer-Net's OpenCV-based code.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

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


@njit(cache=True, nogil=True, inline="always")
def reflect101(i: int, n: int) -> int:
    if n == 1:
        return 0
    while i < 0 or i >= n:
        if i < 0:
            i = -i
        if i >= n:
            i = 2 * n - 2 - i
    return i


@intrinsic
def cttz64(typingctx, x):
    """Number of trailing zero bits of a non-zero uint64 (LLVM ``cttz``: one instruction), as int64."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(1)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return sig, codegen


# ----------------------------------------------------------------------------- connected components


@njit(cache=True, nogil=True, inline="always")
def uf_find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, nogil=True)
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
                ru = uf_find(parent, up)
                rl = uf_find(parent, left)
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
        r = uf_find(parent, i)
        if r == i:
            n += 1
            final[i] = n
        else:
            final[i] = final[r]
    for y in range(h):
        for x in range(w):
            out[y, x] = final[out[y, x]]
    return n


# --------------------------------------------------------------------------------------- watershed keys


@njit(cache=True, nogil=True, inline="always")
def sortable_bits(bits):
    """float32 bit pattern (as int32) -> int64 with the float's order (sign-magnitude to two's complement)."""
    b = np.int64(bits)
    if b < 0:
        b = -(b & 0x7FFFFFFF) - 1
    return b


# ------------------------------------------------------------------------------ instance properties


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def _trace(inst, v, sx, sy, eps, buf, write):
    """Crack-following trace of the outer boundary of the 4-connected piece holding pixel (sx, sy),
    its top-left-most pixel. Vertices at pixel corners; a corner where the region touches itself
    diagonally is cut by ``eps`` on each pass so the ring stays simple. Returns the vertex count
    (the first vertex is repeated at the end when writing).

    The pixel tests are written out in the loop: a helper taking ``inst`` would cost reference-count
    updates per step."""
    h, w = inst.shape
    x = sx
    y = sy
    d = 3
    k = 0
    first = True
    while True:
        if not first and x == sx and y == sy and d == 3:
            break
        first = False
        # pixels ahead-right (r) and ahead-left (l) of vertex (x, y) moving in direction d (region on the right)
        if d == 0:
            rx, ry, lx, ly = x, y, x, y - 1
        elif d == 1:
            rx, ry, lx, ly = x - 1, y, x, y
        elif d == 2:
            rx, ry, lx, ly = x - 1, y - 1, x - 1, y
        else:
            rx, ry, lx, ly = x, y - 1, x - 1, y - 1
        r_in = rx >= 0 and ry >= 0 and rx < w and ry < h and inst[ry, rx] == v
        l_in = lx >= 0 and ly >= 0 and lx < w and ly < h and inst[ly, lx] == v
        if r_in and not l_in:  # straight on: no vertex
            x += _DX[d]
            y += _DY[d]
            continue
        nd = (d + 3) % 4 if r_in else (d + 1) % 4
        if l_in and not r_in:
            if write:
                buf[k, 0] = x - eps * _DX[d]
                buf[k, 1] = y - eps * _DY[d]
                buf[k + 1, 0] = x + eps * _DX[nd]
                buf[k + 1, 1] = y + eps * _DY[nd]
            k += 2
        else:
            if write:
                buf[k, 0] = x
                buf[k, 1] = y
            k += 1
        x += _DX[nd]
        y += _DY[nd]
        d = nd
    if write:
        buf[k, 0] = buf[0, 0]
        buf[k, 1] = buf[0, 1]
    return k + 1


@njit(cache=True, nogil=True)
def _start_pixel(inst, v, bx0, by0, bx1):
    for x in range(bx0, bx1):
        if inst[by0, x] == v:
            return x
    return -1


@njit(cache=True, nogil=True)
def trace_all(inst, start, area, eps, buf):
    """Outer contours of instances 1..n from their first pixels in raster order ``start`` (n, 2)
    (x, y), each traced once into ``buf`` (M0, 2) float64, which is replaced by a larger one when full.

    Returns ``coords (M, 2) float64`` (a fresh array of exactly the vertices), ``offsets (n + 1,)
    int64`` (instance i's closed ring is ``coords[offsets[i]:offsets[i+1]]``; empty when
    ``area[i] == 0``) and the buffer, for reuse.
    """
    n = start.shape[0]
    offsets = np.zeros(n + 1, np.int64)
    k = 0
    for i in range(n):
        if area[i] > 0:
            # at most two vertices per boundary edge (<= 4 edges per pixel), plus the closing one
            need = k + 8 * area[i] + 4
            if need > buf.shape[0]:
                nbuf = np.empty((max(need, 2 * buf.shape[0]), 2), np.float64)
                nbuf[:k] = buf[:k]
                buf = nbuf
            k += _trace(inst, i + 1, start[i, 0], start[i, 1], eps, buf[k:], True)
        offsets[i + 1] = k
    return buf[:k].copy(), offsets, buf


@njit(cache=True, nogil=True)
def trace_contours(inst, bbox, eps):
    """Outer contours of instances 1..n (``bbox`` (n, 4) x0, y0, x1, y1) as one flat buffer.

    Returns ``coords (M, 2) float64`` in (x, y) pixel-corner coordinates (pixel (y, x) spans
    [x, x+1] x [y, y+1]) and ``offsets (n + 1,) int64``; instance i's closed ring is
    ``coords[offsets[i]:offsets[i+1]]``.
    """
    n = bbox.shape[0]
    start = np.zeros((n, 2), np.int64)
    area = np.zeros(n, np.int64)
    for i in range(n):
        sx = _start_pixel(inst, i + 1, bbox[i, 0], bbox[i, 1], bbox[i, 2])
        if sx >= 0:
            start[i, 0] = sx
            start[i, 1] = bbox[i, 1]
            area[i] = (bbox[i, 2] - bbox[i, 0]) * (bbox[i, 3] - bbox[i, 1])  # bounds the boundary
    coords, offsets, _ = trace_all(inst, start, area, eps, np.empty((1024, 2), np.float64))
    return coords, offsets
