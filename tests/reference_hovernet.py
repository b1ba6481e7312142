"""Reference HoVer-Net post-processing and targets in plain scipy / skimage (test and bench yardstick).

A straightforward transcription of the published algorithm (HoVer-Net ``models/hovernet/post_proc.py``
``__proc_np_hv`` + the per-instance loop of ``process``, and ``targets.py`` ``gen_instance_hv_map``),
written the way peers write it: scipy.ndimage / skimage calls on whole arrays, then a Python loop
over instances for the properties. OpenCV calls are replaced by exact scipy equivalents (same Sobel
kernels, reflect-101 borders, 3x3 Gaussian [1, 2, 1] / 4, 5x5 ellipse, erosion border = foreground).
Not production code: it is what the Numba kernels are measured against, for agreement and speed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import find_contours
from skimage.segmentation import watershed

ELLIPSE5 = np.array(
    [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=bool
)


def cv2_sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(derivative, smoothing) correlation kernels of ``cv2.Sobel`` for an odd ``ksize``."""
    smooth = np.array([1.0])
    for _ in range(ksize - 1):
        smooth = np.convolve(smooth, [1.0, 1.0])
    deriv = np.array([1.0])
    for _ in range(ksize - 2):
        deriv = np.convolve(deriv, [1.0, 1.0])
    deriv = np.convolve(deriv, [-1.0, 1.0])  # correlation weights [-1, ..., +1]: f(x+1) - f(x-1) style
    return deriv, smooth


def remove_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """skimage's ``remove_small_objects(labels, min_size)`` on a label image (objects < min_size removed)."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


def _minmax01(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= np.finfo(np.float64).eps:
        return np.zeros_like(a, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def reference_instance_map(
    np_prob: np.ndarray,
    hv: np.ndarray,
    np_threshold: float = 0.5,
    min_object_size: int = 10,
    sobel_ksize: int = 21,
    marker_threshold: float = 0.4,
    min_marker_size: int = 10,
) -> np.ndarray:
    """HoVer-Net ``__proc_np_hv``: (H, W) probability + (2, H, W) HV -> (H, W) int32 instance map."""
    blb = np.asarray(np_prob >= np_threshold, dtype=np.int32)
    blb = ndi.label(blb)[0]
    blb = remove_small_objects(blb, min_size=min_object_size)
    blb[blb > 0] = 1

    h_dir = _minmax01(hv[0].astype(np.float32))
    v_dir = _minmax01(hv[1].astype(np.float32))
    deriv, smooth = cv2_sobel_kernels(sobel_ksize)
    sobelh = ndi.correlate1d(ndi.correlate1d(h_dir.astype(np.float64), deriv, axis=1, mode="mirror"), smooth,
                             axis=0, mode="mirror")
    sobelv = ndi.correlate1d(ndi.correlate1d(v_dir.astype(np.float64), deriv, axis=0, mode="mirror"), smooth,
                             axis=1, mode="mirror")
    sobelh = 1 - _minmax01(sobelh)
    sobelv = 1 - _minmax01(sobelv)

    overall = np.maximum(sobelh, sobelv)
    overall = overall - (1 - blb)
    overall[overall < 0] = 0

    dist = (1.0 - overall) * blb
    g = np.array([0.25, 0.5, 0.25])
    dist = -ndi.correlate1d(ndi.correlate1d(dist, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")

    overall = np.asarray(overall >= marker_threshold, dtype=np.int32)
    marker = blb - overall
    marker[marker < 0] = 0
    marker = ndi.binary_fill_holes(marker)
    marker = ndi.binary_erosion(marker, ELLIPSE5, border_value=1)
    marker = ndi.binary_dilation(marker, ELLIPSE5, border_value=0)
    marker = ndi.label(marker)[0]
    marker = remove_small_objects(marker, min_size=min_marker_size)
    return watershed(dist, markers=marker, mask=blb > 0).astype(np.int32)


def reference_properties(inst: np.ndarray, type_prob: np.ndarray | None = None) -> list[dict]:
    """HoVer-Net-style per-instance loop: bbox, centroid (x, y), contour (x, y), type and type_prob.

    Centroids and contours use the same pixel-corner frame as the kernel (pixel centre = index + 0.5).
    """
    type_map = None if type_prob is None else np.argmax(type_prob, axis=0)
    out = []
    for i, sl in enumerate(ndi.find_objects(inst), start=1):
        if sl is None:
            continue
        crop = inst[sl] == i
        ys, xs = np.nonzero(crop)
        y0, x0 = sl[0].start, sl[1].start
        cont = find_contours(np.pad(crop, 1).astype(np.uint8), 0.5)
        cont = max(cont, key=len)[:, ::-1] + np.array([x0 - 1 + 0.5, y0 - 1 + 0.5])
        rec = {
            "id": i,
            "bbox": (x0, y0, sl[1].stop, sl[0].stop),
            "centroid": (xs.mean() + x0 + 0.5, ys.mean() + y0 + 0.5),
            "area": int(crop.sum()),
            "contour": cont,
            "type": 0,
            "type_prob": 1.0,
        }
        if type_map is not None:
            vals, counts = np.unique(type_map[sl][crop], return_counts=True)
            order = sorted(zip(vals.tolist(), counts.tolist()), key=lambda t: t[1], reverse=True)
            t = order[0][0]
            if t == 0 and len(order) > 1:
                t = order[1][0]
            rec["type"] = int(t)
            rec["type_prob"] = dict(order)[t] / (crop.sum() + 1e-6)
        out.append(rec)
    return out


def reference_hv_to_instances(np_prob, hv, type_prob=None, **kw):
    inst = reference_instance_map(np_prob, hv, **kw)
    return inst, reference_properties(inst, type_prob)


def reference_instances_to_hv(inst_map: np.ndarray, min_size: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """HoVer-Net ``gen_instance_hv_map`` (pieces split, per-piece loop), offsets from the rounded centre
    of mass (without HoVer-Net's one-pixel grid offset, like the kernel)."""
    inst = inst_map.astype(np.int32)
    # fix_mirror_padding: every 4-connected piece of an instance becomes its own instance
    fixed = np.zeros_like(inst)
    nxt = 0
    for i in np.unique(inst[inst > 0]):
        lab, n = ndi.label(inst == i)
        fixed[lab > 0] = lab[lab > 0] + nxt
        nxt += n
    hv = np.zeros((2, *inst.shape), np.float32)
    for i, sl in enumerate(ndi.find_objects(fixed), start=1):
        if sl is None:
            continue
        m = fixed[sl] == i
        if m.sum() < min_size:
            continue
        cy, cx = ndi.center_of_mass(m)
        cy, cx = int(cy + 0.5), int(cx + 0.5)
        yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]]
        for ch, off in ((0, (xx - cx).astype(np.float32)), (1, (yy - cy).astype(np.float32))):
            off[~m] = 0
            neg = off < 0
            pos = off > 0
            if neg.any():
                off[neg] /= -off[neg].min()
            if pos.any():
                off[pos] /= off[pos].max()
            hv[ch][sl][m] = off[m]
    return (inst > 0).astype(np.float32), hv


def noisy_maps(np_t: np.ndarray, hv: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Model-like maps from targets: blurred, noisy NP probabilities and blurred, noisy HV maps."""
    rng = np.random.default_rng(seed)
    p = ndi.gaussian_filter(np_t.astype(np.float32), 1.5)
    p = np.clip(p + rng.normal(0, 0.08, p.shape).astype(np.float32), 0, 1)
    h = np.stack([ndi.gaussian_filter(c, 1.0) for c in hv]).astype(np.float32)
    h = np.clip(h + rng.normal(0, 0.05, h.shape).astype(np.float32), -1, 1)
    return p.astype(np.float32), h
