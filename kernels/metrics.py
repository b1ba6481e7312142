"""Nuclei segmentation and classification metrics: Dice, AJI, PQ, bPQ, mPQ, detection and type F1.

Used by the kernel tests (round trips, Numba vs reference), by head evaluation and by the benchmarks.
Definitions follow HoVer-Net's ``compute_stats.py`` / ``stats_utils.py`` and the PanNuke evaluation
script; where they differ from the textbook reading the docstring says which one is implemented.

Conventions
-----------
* Instance maps are (H, W) integer arrays, 0 = background, any positive ids (need not be contiguous).
* Per-instance types are given as a lookup array ``types`` indexed by instance id
  (``types[i]`` is the class of instance ``i``; ``types[0]`` is ignored), see :func:`instance_types`.
* Centroids are (N, 2) arrays in (x, y) pixel coordinates (any fixed order works for distances).

All pixel overlaps come from one contingency table (``np.unique`` on a combined 64-bit key), so the
cost is O(H*W log(H*W)) whatever the number of instances; no Python loop over instance pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

__all__ = (
    "DetectionScores",
    "PQResult",
    "aji",
    "aji_plus",
    "bpq",
    "detection_scores",
    "dice",
    "instance_types",
    "match_instances",
    "mpq",
    "pair_centroids",
    "pq",
)


class PQResult(NamedTuple):
    """Panoptic quality of one image (unpacks as ``dq, sq, pq``)."""

    dq: float
    sq: float
    pq: float


# --------------------------------------------------------------------------------------------- helpers


def _check_pair(true: np.ndarray, pred: np.ndarray, what: str = "instance maps") -> tuple[np.ndarray, np.ndarray]:
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"{what} differ in shape: true {true.shape} vs pred {pred.shape}")
    if true.ndim != 2:
        raise ValueError(f"{what} must be 2-D (H, W), got true {true.shape}")
    return true, pred


@dataclass(frozen=True)
class _Overlaps:
    """Sparse contingency table between the instances of two maps."""

    true_ids: np.ndarray  # (T,) sorted positive ids present in true
    pred_ids: np.ndarray  # (P,)
    true_area: np.ndarray  # (T,) int64
    pred_area: np.ndarray  # (P,)
    ti: np.ndarray  # (K,) index into true_ids of each overlapping pair
    pi: np.ndarray  # (K,) index into pred_ids
    inter: np.ndarray  # (K,) int64 overlap in pixels
    iou: np.ndarray = field(repr=False)  # (K,) float64


def _overlaps(true: np.ndarray, pred: np.ndarray) -> _Overlaps:
    t = true.ravel().astype(np.int64, copy=False)
    p = pred.ravel().astype(np.int64, copy=False)
    true_ids, t_inv, true_area = np.unique(t, return_inverse=True, return_counts=True)
    pred_ids, p_inv, pred_area = np.unique(p, return_inverse=True, return_counts=True)
    # drop background (id 0 is the first entry when present)
    t_off = 1 if true_ids.size and true_ids[0] == 0 else 0
    p_off = 1 if pred_ids.size and pred_ids[0] == 0 else 0
    npred = pred_ids.size
    key = t_inv.astype(np.int64) * npred + p_inv.astype(np.int64)
    keys, inter = np.unique(key, return_counts=True)
    ti = keys // npred - t_off
    pi = keys % npred - p_off
    keep = (ti >= 0) & (pi >= 0)
    ti, pi, inter = ti[keep], pi[keep], inter[keep].astype(np.int64)
    true_ids, true_area = true_ids[t_off:], true_area[t_off:].astype(np.int64)
    pred_ids, pred_area = pred_ids[p_off:], pred_area[p_off:].astype(np.int64)
    union = true_area[ti] + pred_area[pi] - inter
    iou = inter / union if inter.size else np.zeros(0)
    return _Overlaps(true_ids, pred_ids, true_area, pred_area, ti, pi, inter, iou)


def match_instances(
    true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of instances with IoU strictly above ``iou_threshold``.

    For ``iou_threshold >= 0.5`` the match is unique by construction (HoVer-Net's fast path); below it
    the pairs maximising the summed IoU are chosen (Hungarian), then filtered by the threshold.

    Parameters
    ----------
    true, pred : ndarray, (H, W) int
        Instance maps.
    iou_threshold : float
        Minimum IoU (exclusive) of a match, default 0.5.

    Returns
    -------
    true_ids, pred_ids : ndarray, (M,) int64
        Matched instance ids.
    ious : ndarray, (M,) float64
    """
    true, pred = _check_pair(true, pred)
    ov = _overlaps(true, pred)
    if iou_threshold >= 0.5:
        sel = ov.iou > iou_threshold
        return ov.true_ids[ov.ti[sel]], ov.pred_ids[ov.pi[sel]], ov.iou[sel]
    from scipy.optimize import linear_sum_assignment

    if ov.iou.size == 0:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0)
    # compact the dense problem to the instances that overlap something
    ut, ti = np.unique(ov.ti, return_inverse=True)
    up, pi = np.unique(ov.pi, return_inverse=True)
    cost = np.zeros((ut.size, up.size))
    cost[ti, pi] = -ov.iou
    r, c = linear_sum_assignment(cost)
    ious = -cost[r, c]
    sel = ious > iou_threshold
    return ov.true_ids[ut[r[sel]]], ov.pred_ids[up[c[sel]]], ious[sel]


# --------------------------------------------------------------------------------------------- metrics


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Binary Dice of the foregrounds (``> 0``), HoVer-Net's ``get_dice_1``.

    Returns 1.0 when both foregrounds are empty.
    """
    true, pred = _check_pair(true, pred, "masks")
    t = true > 0
    p = pred > 0
    denom = int(t.sum()) + int(p.sum())
    if denom == 0:
        return 1.0
    return 2.0 * float(np.logical_and(t, p).sum()) / denom


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017, HoVer-Net ``get_fast_aji``).

    Each ground-truth instance is paired with the prediction of highest IoU (a prediction may be chosen
    by several GT instances); intersections and unions of the pairs are summed, GT instances that touch
    no prediction add their area to the union, and predictions never chosen add theirs.

    Returns 1.0 when both maps are empty, 0.0 when only one is.
    """
    true, pred = _check_pair(true, pred)
    ov = _overlaps(true, pred)
    nt, npr = ov.true_ids.size, ov.pred_ids.size
    if nt == 0 and npr == 0:
        return 1.0
    union_pairs = ov.true_area[ov.ti] + ov.pred_area[ov.pi] - ov.inter
    # best prediction per GT: sort by (ti, -iou) and take the first of each ti
    order = np.lexsort((-ov.iou, ov.ti))
    ti_s = ov.ti[order]
    first = np.ones(ti_s.size, dtype=bool)
    first[1:] = ti_s[1:] != ti_s[:-1]
    best = order[first]
    inter_sum = int(ov.inter[best].sum())
    union_sum = int(union_pairs[best].sum())
    paired_t = np.zeros(nt, dtype=bool)
    paired_t[ov.ti[best]] = True
    used_p = np.zeros(npr, dtype=bool)
    used_p[ov.pi[best]] = True
    union_sum += int(ov.true_area[~paired_t].sum()) + int(ov.pred_area[~used_p].sum())
    return inter_sum / union_sum if union_sum else 0.0


def aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ (HoVer-Net ``get_fast_aji_plus``): like :func:`aji` but with a one-to-one (Hungarian,
    maximum summed IoU) pairing, so no prediction is counted twice."""
    from scipy.optimize import linear_sum_assignment

    true, pred = _check_pair(true, pred)
    ov = _overlaps(true, pred)
    nt, npr = ov.true_ids.size, ov.pred_ids.size
    if nt == 0 and npr == 0:
        return 1.0
    inter_sum = union_sum = 0
    paired_t = np.zeros(nt, dtype=bool)
    used_p = np.zeros(npr, dtype=bool)
    if ov.iou.size:
        cost = np.zeros((nt, npr))
        cost[ov.ti, ov.pi] = -ov.iou
        inter_d = np.zeros((nt, npr), dtype=np.int64)
        inter_d[ov.ti, ov.pi] = ov.inter
        r, c = linear_sum_assignment(cost)
        keep = cost[r, c] < 0
        r, c = r[keep], c[keep]
        inter = inter_d[r, c]
        inter_sum = int(inter.sum())
        union_sum = int((ov.true_area[r] + ov.pred_area[c] - inter).sum())
        paired_t[r] = True
        used_p[c] = True
    union_sum += int(ov.true_area[~paired_t].sum()) + int(ov.pred_area[~used_p].sum())
    return inter_sum / union_sum if union_sum else 0.0


def pq(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> PQResult:
    """Panoptic quality of one image (Kirillov et al.; HoVer-Net ``get_fast_pq``).

    ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ = mean IoU of the TP pairs``, ``PQ = DQ * SQ``, with pairs
    matched by :func:`match_instances` (IoU > ``iou_threshold``).

    Returns
    -------
    PQResult
        ``(dq, sq, pq)``. Both maps empty gives ``(1, 1, 1)`` (perfect agreement); no TP otherwise
        gives ``sq = 0`` (HoVer-Net returns 0 there too, through its epsilon).
    """
    true, pred = _check_pair(true, pred)
    ov = _overlaps(true, pred)
    nt, npr = ov.true_ids.size, ov.pred_ids.size
    if nt == 0 and npr == 0:
        return PQResult(1.0, 1.0, 1.0)
    if iou_threshold >= 0.5:
        ious = ov.iou[ov.iou > iou_threshold]
    else:
        ious = match_instances(true, pred, iou_threshold)[2]
    tp = ious.size
    fp = npr - tp
    fn = nt - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(ious.sum()) / tp if tp else 0.0
    return PQResult(dq, sq, dq * sq)


def instance_types(inst: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """Per-instance class by majority vote of a per-pixel type map.

    Parameters
    ----------
    inst : ndarray, (H, W) int
        Instance map.
    type_map : ndarray, (H, W) int
        Per-pixel class (0 background).

    Returns
    -------
    ndarray, (inst.max() + 1,) int32
        ``types[i]`` the majority class of instance ``i`` (ties go to the smaller class id);
        0 for ids that are absent.
    """
    inst, type_map = _check_pair(inst, type_map, "instance and type maps")
    n = int(inst.max()) + 1 if inst.size else 1
    k = int(type_map.max()) + 1 if type_map.size else 1
    counts = np.bincount(inst.ravel().astype(np.int64) * k + type_map.ravel().astype(np.int64), minlength=n * k)
    counts = counts.reshape(n, k)
    types = counts.argmax(axis=1).astype(np.int32)
    types[0] = 0
    return types


def _split_by_type(inst: np.ndarray, types: np.ndarray, c: int) -> np.ndarray:
    types = np.asarray(types)
    lut = np.zeros(max(int(inst.max()) + 1, types.size), dtype=bool)
    lut[: types.size] = types == c
    lut[0] = False
    return np.where(lut[inst], inst, 0)


def _as_list(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(x, np.ndarray) and x.ndim == 2:
        return [x]
    return list(x)


def _as_type_list(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(x, np.ndarray) and x.ndim == 1:
        return [x]
    return [np.asarray(v) for v in x]


def bpq(
    trues: np.ndarray | Sequence[np.ndarray],
    preds: np.ndarray | Sequence[np.ndarray],
    iou_threshold: float = 0.5,
) -> float:
    """Binary PQ (PanNuke ``bPQ``): class-agnostic PQ per image, averaged over images.

    As in the PanNuke evaluation script, images whose ground truth is empty are skipped (they have no
    defined PQ there); NaN if every image is skipped.
    """
    ts, ps = _as_list(trues), _as_list(preds)
    if len(ts) != len(ps):
        raise ValueError(f"bpq: {len(ts)} ground-truth maps vs {len(ps)} predictions")
    vals = [pq(t, p, iou_threshold).pq for t, p in zip(ts, ps) if np.any(np.asarray(t) > 0)]
    return float(np.mean(vals)) if vals else float("nan")


def mpq(
    trues: np.ndarray | Sequence[np.ndarray],
    preds: np.ndarray | Sequence[np.ndarray],
    true_types: np.ndarray | Sequence[np.ndarray],
    pred_types: np.ndarray | Sequence[np.ndarray],
    classes: Sequence[int],
    mode: Literal["pannuke", "aggregate"] = "pannuke",
    iou_threshold: float = 0.5,
) -> float:
    """Multi-class PQ over a set of images.

    Parameters
    ----------
    trues, preds : ndarray (H, W) or sequence of them
        Instance maps.
    true_types, pred_types : ndarray (N+1,) or sequence of them
        Per-instance class lookups (``types[id]``), one per image.
    classes : sequence of int
        The class ids that count (background excluded).
    mode : {"pannuke", "aggregate"}
        ``"pannuke"`` (default) is the PanNuke evaluation script: per image, the PQ of each class is
        computed on the instances of that class, classes whose *ground truth is empty in that image
        are skipped* (even if the prediction has instances of that class; this is what the script
        does, ``len(np.unique(true_tmp)) == 1 -> nan``), the image's mPQ is the mean over the remaining
        classes, and the result is the mean over images that have at least one such class.
        ``"aggregate"`` (CoNIC's mPQ+): per class, TP/FP/FN and the IoU sum are accumulated over all
        images, PQ is computed once per class, and the classes are averaged; a class absent from both
        the ground truth and the prediction of every image is skipped.

    Returns
    -------
    float
        NaN when nothing could be scored.
    """
    ts, ps = _as_list(trues), _as_list(preds)
    tt, pt = _as_type_list(true_types), _as_type_list(pred_types)
    if not (len(ts) == len(ps) == len(tt) == len(pt)):
        raise ValueError(
            f"mpq: {len(ts)} ground-truth maps, {len(ps)} predictions, {len(tt)} and {len(pt)} type lookups"
        )
    if mode == "pannuke":
        per_image: list[float] = []
        for t, p, a, b in zip(ts, ps, tt, pt):
            t, p = _check_pair(t, p)
            vals = []
            for c in classes:
                tc = _split_by_type(t, a, c)
                if not tc.any():
                    continue
                vals.append(pq(tc, _split_by_type(p, b, c), iou_threshold).pq)
            if vals:
                per_image.append(float(np.mean(vals)))
        return float(np.mean(per_image)) if per_image else float("nan")
    if mode != "aggregate":
        raise ValueError(f"mpq: mode={mode!r} not one of 'pannuke', 'aggregate'")
    scores = []
    for c in classes:
        tp = fp = fn = 0
        iou_sum = 0.0
        for t, p, a, b in zip(ts, ps, tt, pt):
            t, p = _check_pair(t, p)
            tc = _split_by_type(t, a, c)
            pc = _split_by_type(p, b, c)
            _, _, ious = match_instances(tc, pc, iou_threshold)
            nt = np.unique(tc).size - (1 if (tc == 0).any() else 0)
            npr = np.unique(pc).size - (1 if (pc == 0).any() else 0)
            tp += ious.size
            fp += npr - ious.size
            fn += nt - ious.size
            iou_sum += float(ious.sum())
        if tp + fp + fn == 0:
            continue
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = iou_sum / tp if tp else 0.0
        scores.append(dq * sq)
    return float(np.mean(scores)) if scores else float("nan")


# --------------------------------------------------------------------------------------------- detection


def pair_centroids(
    true_xy: np.ndarray, pred_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair centroids one-to-one (Hungarian on Euclidean distance), keeping pairs within ``radius``.

    HoVer-Net's ``pair_coordinates``: the assignment minimises the total distance over all points, and
    pairs farther apart than ``radius`` are then dropped (both points become unpaired).

    Returns
    -------
    pairs : ndarray, (M, 2) int64
        ``(index into true_xy, index into pred_xy)``.
    unpaired_true, unpaired_pred : ndarray, int64
    """
    from scipy.optimize import linear_sum_assignment

    a = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((0, 2), np.int64), np.arange(a.shape[0]), np.arange(b.shape[0])
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    r, c = linear_sum_assignment(d)
    ok = d[r, c] <= radius
    pairs = np.stack([r[ok], c[ok]], axis=1).astype(np.int64)
    ut = np.setdiff1d(np.arange(a.shape[0]), pairs[:, 0])
    up = np.setdiff1d(np.arange(b.shape[0]), pairs[:, 1])
    return pairs, ut, up


@dataclass(frozen=True)
class DetectionScores:
    """Detection and classification scores (HoVer-Net ``run_nuclei_type_stat``).

    Attributes
    ----------
    f1, precision, recall : float
        Detection F1 (``F_d``), precision and recall of centroids paired within the radius.
    type_accuracy : float
        Fraction of paired nuclei whose type agrees (NaN without types or pairs).
    type_f1 : dict[int, float]
        ``F_c`` per class (empty without types).
    tp, fp, fn : int
    """

    f1: float
    precision: float
    recall: float
    type_accuracy: float
    type_f1: dict[int, float]
    tp: int
    fp: int
    fn: int


def detection_scores(
    true_xy: np.ndarray | Sequence[np.ndarray],
    pred_xy: np.ndarray | Sequence[np.ndarray],
    true_types: np.ndarray | Sequence[np.ndarray] | None = None,
    pred_types: np.ndarray | Sequence[np.ndarray] | None = None,
    radius: float = 12.0,
    classes: Sequence[int] | None = None,
) -> DetectionScores:
    """Detection F1 and per-class classification F1 over one image or a set (pairs pooled).

    Parameters
    ----------
    true_xy, pred_xy : ndarray (N, 2) float, or sequence of them (one per image)
        Centroids; each image is paired separately (:func:`pair_centroids`), counts are pooled.
    true_types, pred_types : ndarray (N,) int or sequences, optional
        The class of each centroid (same order as the centroids, *not* indexed by instance id).
    radius : float
        Pairing radius in pixels: 12 at 40x (0.25 mpp), 6 at 20x, as in HoVer-Net.
    classes : sequence of int, optional
        Classes to score; default every class seen in either set.

    Notes
    -----
    ``F_c = 2 (TP_c + TN_c) / (2 (TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d,c + FN_d,c)`` where, among
    paired nuclei where the true or predicted class is ``c``, ``TP_c`` agree on ``c``, ``FP_c`` are
    predicted ``c`` but truly another class, ``FN_c`` the reverse, and ``FP_d,c`` / ``FN_d,c`` are the
    unpaired predictions / ground truths of class ``c``. ``TN_c`` is always 0 after that selection
    (kept for fidelity to HoVer-Net's formula).
    """
    single = isinstance(true_xy, np.ndarray) and true_xy.ndim == 2
    ta = [true_xy] if single else list(true_xy)
    pa = [pred_xy] if single else list(pred_xy)
    if len(ta) != len(pa):
        raise ValueError(f"detection_scores: {len(ta)} ground-truth sets vs {len(pa)} predicted sets")
    has_types = true_types is not None and pred_types is not None
    if has_types:
        tta = [np.asarray(true_types)] if single else [np.asarray(x) for x in true_types]  # type: ignore[union-attr]
        pta = [np.asarray(pred_types)] if single else [np.asarray(x) for x in pred_types]  # type: ignore[union-attr]
    paired_t: list[np.ndarray] = []
    paired_p: list[np.ndarray] = []
    unp_t: list[np.ndarray] = []
    unp_p: list[np.ndarray] = []
    tp = fp = fn = 0
    for k, (a, b) in enumerate(zip(ta, pa)):
        a = np.asarray(a, dtype=np.float64).reshape(-1, 2)
        b = np.asarray(b, dtype=np.float64).reshape(-1, 2)
        pairs, ut, up = pair_centroids(a, b, radius)
        tp += pairs.shape[0]
        fn += ut.size
        fp += up.size
        if has_types:
            at, bt = tta[k].reshape(-1), pta[k].reshape(-1)
            if at.size != a.shape[0] or bt.size != b.shape[0]:
                raise ValueError(
                    f"detection_scores: image {k}: {a.shape[0]} true centroids vs {at.size} types, "
                    f"{b.shape[0]} predicted centroids vs {bt.size} types"
                )
            paired_t.append(at[pairs[:, 0]])
            paired_p.append(bt[pairs[:, 1]])
            unp_t.append(at[ut])
            unp_p.append(bt[up])
    precision = tp / (tp + fp) if tp + fp else (1.0 if tp + fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if tp + fp == 0 else 0.0)
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
    type_f1: dict[int, float] = {}
    acc = float("nan")
    if has_types:
        pt_ = np.concatenate(paired_t) if paired_t else np.zeros(0, np.int64)
        pp_ = np.concatenate(paired_p) if paired_p else np.zeros(0, np.int64)
        ut_ = np.concatenate(unp_t) if unp_t else np.zeros(0, np.int64)
        up_ = np.concatenate(unp_p) if unp_p else np.zeros(0, np.int64)
        if pt_.size:
            acc = float((pt_ == pp_).mean())
        if classes is None:
            classes = sorted(int(c) for c in np.unique(np.concatenate([pt_, pp_, ut_, up_])) if c > 0)
        w = (2.0, 2.0, 1.0, 1.0)
        for c in classes:
            sel = (pt_ == c) | (pp_ == c)
            a, b = pt_[sel], pp_[sel]
            tp_c = int(((a == c) & (b == c)).sum())
            tn_c = int(((a != c) & (b != c)).sum())
            fp_c = int(((a != c) & (b == c)).sum())
            fn_c = int(((a == c) & (b != c)).sum())
            fp_d = int((up_ == c).sum())
            fn_d = int((ut_ == c).sum())
            num = 2.0 * (tp_c + tn_c)
            den = num + w[0] * fp_c + w[1] * fn_c + w[2] * fp_d + w[3] * fn_d
            type_f1[int(c)] = num / den if den else float("nan")
    return DetectionScores(f1, precision, recall, acc, type_f1, tp, fp, fn)
