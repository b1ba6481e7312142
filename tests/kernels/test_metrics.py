"""Metrics: hand-made cases with known answers, and a slow loop-per-instance implementation compared on
real CoNSeP / MoNuSeg masks with realistic perturbations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellvit_optimus.engine.training.datasets import load_consep, load_monuseg
from cellvit_optimus.kernels import (
    aji,
    aji_plus,
    bpq,
    detection_scores,
    dice,
    instance_types,
    match_instances,
    mpq,
    pair_centroids,
    pq,
)


def _squares(shape, boxes):
    m = np.zeros(shape, np.int32)
    for i, (y0, x0, y1, x1) in enumerate(boxes, start=1):
        m[y0:y1, x0:x1] = i
    return m


# ----------------------------------------------------------------------------------- hand-made cases


def test_identical_maps_are_perfect():
    m = _squares((40, 40), [(0, 0, 10, 10), (20, 20, 30, 35)])
    assert tuple(pq(m, m)) == (1.0, 1.0, 1.0)
    assert aji(m, m) == 1.0 and aji_plus(m, m) == 1.0 and dice(m, m) == 1.0


def test_empty_maps():
    z = np.zeros((8, 8), np.int32)
    m = _squares((8, 8), [(0, 0, 3, 3)])
    assert tuple(pq(z, z)) == (1.0, 1.0, 1.0)
    assert pq(m, z).pq == 0.0 and pq(z, m).pq == 0.0
    assert aji(m, z) == 0.0 and dice(z, z) == 1.0 and dice(m, z) == 0.0


def test_pq_aji_dice_known_values():
    true = _squares((60, 60), [(0, 0, 10, 10), (20, 20, 30, 30)])
    # first exact; second shifted 5 px (IoU 50/150 < 0.5); one extra false positive
    pred = _squares((60, 60), [(0, 0, 10, 10), (20, 25, 30, 35), (45, 45, 55, 55)])
    dq, sq, p = pq(true, pred)
    assert dq == pytest.approx(1 / (1 + 0.5 * 2 + 0.5 * 1))
    assert sq == pytest.approx(1.0)
    assert p == pytest.approx(0.4)
    assert aji(true, pred) == pytest.approx(150 / 350)
    assert dice(true, pred) == pytest.approx(300 / 500)
    # relabelling predictions changes nothing
    perm = np.array([0, 3, 1, 2])[pred]
    assert pq(true, perm) == pq(true, pred)


def test_pq_sq_partial_overlap_and_low_threshold():
    true = _squares((30, 30), [(0, 0, 10, 10)])
    pred = _squares((30, 30), [(0, 2, 10, 12)])  # IoU 80/120
    assert pq(true, pred).sq == pytest.approx(80 / 120)
    shifted = _squares((30, 30), [(0, 6, 10, 16)])  # IoU 40/160 = 0.25
    assert pq(true, shifted).pq == 0.0
    t, p, iou = match_instances(true, shifted, iou_threshold=0.2)
    assert t.tolist() == [1] and p.tolist() == [1] and iou[0] == pytest.approx(0.25)
    assert pq(true, shifted, iou_threshold=0.2).pq == pytest.approx(0.25)


def test_aji_vs_aji_plus_on_a_merge():
    true = _squares((10, 20), [(0, 0, 10, 10), (0, 10, 10, 20)])
    pred = np.ones((10, 20), np.int32)  # one prediction covering both
    assert aji(true, pred) == pytest.approx(200 / 400)  # the prediction is reused by both GT nuclei
    assert aji_plus(true, pred) == pytest.approx(100 / 300)  # one-to-one: second GT unpaired


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        pq(np.zeros((4, 4), int), np.zeros((4, 5), int))


def test_detection_f1_known_values():
    true = np.array([[0.0, 0.0], [10.0, 0.0], [50.0, 50.0]])
    pred = np.array([[3.0, 4.0], [10.0, 13.0], [100.0, 100.0]])
    pairs, ut, up = pair_centroids(true, pred, radius=12)
    assert pairs.tolist() == [[0, 0]] and ut.tolist() == [1, 2] and up.tolist() == [1, 2]
    s = detection_scores(true, pred, radius=12)
    assert (s.tp, s.fp, s.fn) == (1, 2, 2)
    assert s.f1 == pytest.approx(1 / 3)
    assert detection_scores(true, pred, radius=13).tp == 2


def test_type_f1_hovernet_definition():
    # four paired nuclei (far apart), one unpaired prediction of class 1, one unpaired truth of class 2
    true = np.array([[0, 0], [100, 0], [200, 0], [300, 0], [600, 600]], float)
    pred = np.array([[0, 1], [100, 1], [200, 1], [300, 1], [900, 900]], float)
    tt = np.array([1, 1, 2, 2, 2])
    pt = np.array([1, 2, 2, 1, 1])
    s = detection_scores(true, pred, tt, pt, radius=12)
    # class 1: paired (1,1) tp, (1,2) fn, (2,1) fp; unpaired pred of class 1 -> fp_d
    assert s.type_f1[1] == pytest.approx(2 / (2 + 2 + 2 + 1 + 0))
    # class 2: paired (2,2) tp, (1,2) fp, (2,1) fn; unpaired true of class 2 -> fn_d
    assert s.type_f1[2] == pytest.approx(2 / (2 + 2 + 2 + 0 + 1))
    assert s.type_accuracy == pytest.approx(0.5)
    # lists of images pool the pairs
    s2 = detection_scores([true, true], [pred, pred], [tt, tt], [pt, pt], radius=12)
    assert s2.type_f1 == pytest.approx(s.type_f1) and s2.tp == 2 * s.tp


def test_mpq_pannuke_and_aggregate_and_bpq():
    shape = (40, 40)
    # image A: GT class1 nucleus exact, GT class2 nucleus found but typed class1
    ta = _squares(shape, [(0, 0, 10, 10), (20, 20, 30, 30)])
    pa = ta.copy()
    tta, pta = np.array([0, 1, 2]), np.array([0, 1, 1])
    # image B: GT one class1 nucleus exact, plus a predicted class2 false positive
    tb = _squares(shape, [(0, 0, 10, 10)])
    pb = _squares(shape, [(0, 0, 10, 10), (20, 20, 30, 30)])
    ttb, ptb = np.array([0, 1]), np.array([0, 1, 2])
    # PanNuke: A -> mean(class1 PQ 2/3, class2 PQ 0) = 1/3; B -> class1 PQ 1, class2 skipped (GT empty)
    assert mpq([ta, tb], [pa, pb], [tta, ttb], [pta, ptb], classes=[1, 2]) == pytest.approx((1 / 3 + 1) / 2)
    # aggregate (mPQ+): class1 tp 2 fp 1 -> 0.8; class2 tp 0 -> 0
    agg = mpq([ta, tb], [pa, pb], [tta, ttb], [pta, ptb], classes=[1, 2], mode="aggregate")
    assert agg == pytest.approx(0.4)
    assert bpq([ta, tb], [pa, pb]) == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="mode"):
        mpq(ta, pa, tta, pta, classes=[1], mode="nope")  # type: ignore[arg-type]


def test_instance_types_majority():
    inst = _squares((10, 10), [(0, 0, 4, 4), (5, 5, 10, 10)])
    tm = np.zeros_like(inst)
    tm[inst == 1] = 3
    tm[0, 0] = 2
    tm[inst == 2] = 1
    assert instance_types(inst, tm).tolist() == [0, 3, 1]


# ------------------------------------------------------------------ a second, naive implementation


def _naive_pairs(true, pred):
    out = []
    for t in np.unique(true[true > 0]):
        tm = true == t
        for p in np.unique(pred[tm]):
            if p == 0:
                continue
            pm = pred == p
            inter = np.logical_and(tm, pm).sum()
            union = np.logical_or(tm, pm).sum()
            out.append((t, p, inter, union))
    return out


def _naive_pq(true, pred):
    pairs = [(t, p, i / u) for t, p, i, u in _naive_pairs(true, pred) if i / u > 0.5]
    nt = len(np.unique(true[true > 0]))
    npr = len(np.unique(pred[pred > 0]))
    tp = len(pairs)
    if nt + npr == 0:
        return 1.0, 1.0, 1.0
    dq = tp / (tp + 0.5 * (npr - tp) + 0.5 * (nt - tp))
    sq = sum(x[2] for x in pairs) / tp if tp else 0.0
    return dq, sq, dq * sq


def _naive_aji(true, pred):
    pairs = _naive_pairs(true, pred)
    inter = union = 0
    used = set()
    for t in np.unique(true[true > 0]):
        cand = [x for x in pairs if x[0] == t]
        if not cand:
            union += (true == t).sum()
            continue
        best = max(cand, key=lambda x: x[2] / x[3])
        inter += best[2]
        union += best[3]
        used.add(best[1])
    for p in np.unique(pred[pred > 0]):
        if p not in used:
            union += (pred == p).sum()
    return inter / union


def _perturb(inst, rng):
    """Realistic prediction errors: 1-px erosion, a small shift, dropped and merged nuclei, a spurious one."""
    out = np.where(ndi.grey_erosion(inst, size=3) == inst, inst, 0)
    out = np.roll(out, (1, -1), axis=(0, 1))
    ids = np.unique(inst[inst > 0])
    for d in rng.choice(ids, size=max(1, ids.size // 10), replace=False):
        out[out == d] = 0
    a, b = rng.choice(ids, size=2, replace=False)
    out[out == b] = a
    out[:6, :6] = out.max() + 1
    return out


@pytest.fixture(scope="module")
def real_masks(nuclei_dir):
    c = load_consep(nuclei_dir)
    m = load_monuseg(nuclei_dir)
    return [c[0].inst_map, c[17].inst_map, c[55].inst_map, m[0].inst_map[:300, :300], m[5].inst_map[500:800, 200:500]]


def test_against_naive_on_real_masks(real_masks):
    rng = np.random.default_rng(0)
    for gt in real_masks:
        pred = _perturb(gt, rng)
        assert tuple(pq(gt, pred)) == pytest.approx(_naive_pq(gt, pred))
        assert aji(gt, pred) == pytest.approx(_naive_aji(gt, pred))
        t, p = gt > 0, pred > 0
        assert dice(gt, pred) == pytest.approx(2 * (t & p).sum() / (t.sum() + p.sum()))
        # sanity: the perturbation lowers the scores but leaves them meaningful
        assert 0.3 < pq(gt, pred).pq < 1.0


def test_detection_on_real_centroids(real_masks):
    gt = real_masks[0]
    ids = np.unique(gt[gt > 0])
    cy, cx = np.array(ndi.center_of_mass(np.ones_like(gt), gt, ids)).T
    xy = np.stack([cx, cy], axis=1)
    rng = np.random.default_rng(1)
    jitter = xy + rng.normal(0, 2.0, xy.shape)
    s = detection_scores(xy, jitter[3:], radius=12)
    assert (s.tp, s.fn, s.fp) == (ids.size - 3, 3, 0)
