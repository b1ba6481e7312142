"""Calibrate the bundled nucleus-type conformal state, ``engine/data/default_nuclei_conformal.json``.

``python bench/fit_nucleus_conformal.py [--out PATH] [--json bench/results/nucleus_conformal.json]``

Calibration data: the CoNSeP *validation* images of the bundled model (the ``consep/`` entries of
bench/train_default_nuclei.py ``VAL``: training images it never trained on, whole 1000x1000), never a
held-out image (tests/engine/training/test_heldout_discipline.py checks). Each image is segmented by
the bundled model exactly as the engine does (:func:`segment_image`: resampled to 0.5 um/px, the
checkpoint's post-processing); a predicted nucleus is paired with the annotated nucleus it overlaps with IoU >= 0.5, and its type
scores (mean class probabilities over its pixels, background dropped and renormalised) with that
nucleus' merged CoNSeP type form one calibration pair. RAPS at alpha 0.1 (the safety layer's
defaults). The state is saved with the checkpoint's hash (``model_id``, the first 16 hex digits of
its SHA-256, as the engine computes it), the backbone id and the backbone weights hash; the engine
refuses it for anything else.

Reported (``--json``): coverage and set sizes on random halves of the calibration nuclei grouped by
image quadrant (calibrate on 8 of the 16 quadrants, measure on the other 8, 200 splits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from cellvit_optimus.engine.data import DATA_DIR
from cellvit_optimus.engine.io import atomic_write_bytes
from cellvit_optimus.safety import SplitConformal
from cellvit_optimus.safety.conformal import type_probabilities

MIN_IOU = 0.5


def calibration_samples() -> list:
    """the calibration images: the bundled model's CoNSeP validation images, whole"""
    sys.path.insert(0, str(ROOT / "bench"))
    from train_default_nuclei import VAL

    from cellvit_optimus.engine.training.datasets import load_consep

    groups = [g for g in VAL if g.startswith("consep/")]
    return [s for s in load_consep(split="train", whole=True) if s.group in groups]


def quadrant(xy: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """index 0..3 of the image quadrant each (x, y) centroid falls in"""
    return (xy[:, 1] >= shape[0] / 2).astype(np.int64) * 2 + (xy[:, 0] >= shape[1] / 2)


def model_id(path: Path) -> str:
    """the checkpoint id the engine checks (``Engine._model_hash``)"""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def pairs(model, sample, with_quadrant: bool = False):
    """(probabilities ``(M, K)``, true types ``(M,)`` 0-based) of the predicted nuclei of ``sample``
    that match an annotated nucleus (IoU >= 0.5); with ``with_quadrant`` also each one's image quadrant"""
    from cellvit_optimus.engine.pipeline.nuclei import segment_image

    r = segment_image(sample.image, sample.mpp, model)
    gt, pr = sample.inst_map, r.inst_map
    k = model.num_classes
    if not len(r.table):
        empty = (np.zeros((0, k)), np.zeros(0, np.int64))
        return (*empty, np.zeros(0, np.int64)) if with_quadrant else empty
    probs = type_probabilities(r.table.type_scores)
    # overlap counts of every (pred, gt) pair in one pass
    both = (pr > 0) & (gt > 0)
    key = pr[both].astype(np.int64) * (int(gt.max()) + 1) + gt[both]
    uniq, inter = np.unique(key, return_counts=True)
    p_ids, g_ids = uniq // (int(gt.max()) + 1), uniq % (int(gt.max()) + 1)
    p_area = np.bincount(pr.ravel(), minlength=int(pr.max()) + 1)
    g_area = np.bincount(gt.ravel(), minlength=int(gt.max()) + 1)
    iou = inter / (p_area[p_ids] + g_area[g_ids] - inter)
    best: dict[int, tuple[float, int]] = {}
    for p, g, v in zip(p_ids.tolist(), g_ids.tolist(), iou.tolist()):
        if v >= MIN_IOU and v > best.get(p, (0.0, 0))[0]:
            best[p] = (v, g)
    xs, ys, qs = [], [], []
    cent = np.asarray(r.table.centroids, np.float64).reshape(-1, 2)
    for p, (_, g) in sorted(best.items()):
        t = int(np.bincount(sample.type_map[gt == g]).argmax())
        if 1 <= t <= k:
            xs.append(probs[p - 1])
            ys.append(t - 1)
            qs.append(int(quadrant(cent[p - 1:p], gt.shape)[0]))
    out = np.asarray(xs).reshape(-1, k), np.asarray(ys, np.int64)
    return (*out, np.asarray(qs, np.int64)) if with_quadrant else out


def calibrate(probs: np.ndarray, labels: np.ndarray) -> SplitConformal:
    return SplitConformal(alpha=0.1, score="raps", randomized=True, lam=0.1, k_reg=1).fit(probs, labels)


def main() -> None:
    import torch
    from cellvit_optimus.engine.pipeline.nuclei import NucleiModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DATA_DIR / "default_nuclei_conformal.json"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "nucleus_conformal.json"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = NucleiModel()
    samples = calibration_samples()
    got = [pairs(model, s, with_quadrant=True) for s in samples]
    p = np.concatenate([g[0] for g in got])
    y = np.concatenate([g[1] for g in got])
    # 16 groups: image x quadrant, for the split-half coverage check
    grp = np.concatenate([i * 4 + g[2] for i, g in enumerate(got)])
    cp = calibrate(p, y)
    names = [model.profile.label(i) for i in range(1, model.num_classes + 1)]
    assert model.path is not None
    prov = {"script": "bench/fit_nucleus_conformal.py", "calibration": [s.group for s in samples],
            "images": len(samples), "nuclei": int(y.size),
            "per_class": np.bincount(y, minlength=len(names)).tolist(), "match": f"IoU >= {MIN_IOU}"}
    atomic_write_bytes(a.out, cp.to_bytes(model_id=model_id(model.path), backbone_id=model.runner.preset.name,
                                          weights_hash=model.runner.weights_id, class_names=names, provenance=prov))

    rng = np.random.default_rng(0)
    covs, sizes = [], []
    ids = np.unique(grp)
    for _ in range(200):
        perm = rng.permutation(ids)
        fit_on = np.isin(grp, perm[: ids.size // 2])
        c = calibrate(p[fit_on], y[fit_on])
        s = c.predict_sets(p[~fit_on])
        covs.append(c.coverage(s, y[~fit_on]))
        sizes.append(float(s.sum(1).mean()))
    s_cal = cp.predict_sets(p)
    res = {"command": "python bench/fit_nucleus_conformal.py", "state": Path(a.out).name, **prov,
           "alpha": cp.alpha, "score": cp.score, "quantile": round(float(cp.quantiles()[0]), 4),
           "class_names": names, "top1_accuracy_calibration": round(float((p.argmax(1) == y).mean()), 4),
           "set_size_histogram": np.bincount(s_cal.sum(1), minlength=len(names) + 1).tolist(),
           "split_halves": {"splits": 200, "groups": "image quadrants", "n_groups": int(ids.size),
                            "coverage_mean": round(float(np.mean(covs)), 4),
                            "coverage_sd": round(float(np.std(covs)), 4),
                            "mean_set_size": round(float(np.mean(sizes)), 3)}}
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
