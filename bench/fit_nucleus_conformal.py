"""Calibrate the bundled nucleus-type conformal state, ``engine/data/default_nuclei_conformal.json``.

``python bench/fit_nucleus_conformal.py [--out PATH] [--json bench/results/nucleus_conformal.json]``

Calibration data: the CoNSeP image the bundled nuclei model never saw in training (``consep/test_2``,
16 patches; engine/data/README.md). Each patch is segmented by the bundled model exactly as the
engine does (:func:`segment_image`: resampled to 0.5 um/px, the checkpoint's post-processing); a
predicted nucleus is paired with the annotated nucleus it overlaps with IoU >= 0.5, and its type
scores (mean class probabilities over its pixels, background dropped and renormalised) with that
nucleus' merged CoNSeP type form one calibration pair. RAPS at alpha 0.1 (the safety layer's
defaults). The state is saved with the checkpoint's hash (``model_id``, the first 16 hex digits of
its SHA-256, as the engine computes it), the backbone id and the backbone weights hash; the engine
refuses it for anything else.

Reported (``--json``): coverage and set sizes on random halves of the held-out patches (calibrate on
8, measure on the other 8, 200 splits), and on the training images for reference (not a valid
coverage check: the model has seen them, so its scores there are not exchangeable with the
calibration's).
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

CALIBRATION_GROUP = "consep/test_2"
MIN_IOU = 0.5


def model_id(path: Path) -> str:
    """the checkpoint id the engine checks (``Engine._model_hash``)"""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def pairs(model, sample) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities ``(M, K)``, true types ``(M,)`` 0-based) of the predicted nuclei of ``sample``
    that match an annotated nucleus (IoU >= 0.5)"""
    from cellvit_optimus.engine.pipeline.nuclei import segment_image

    r = segment_image(sample.image, sample.mpp, model)
    gt, pr = sample.inst_map, r.inst_map
    k = model.num_classes
    if not len(r.table):
        return np.zeros((0, k)), np.zeros(0, np.int64)
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
    xs, ys = [], []
    for p, (_, g) in sorted(best.items()):
        t = int(np.bincount(sample.type_map[gt == g]).argmax())
        if 1 <= t <= k:
            xs.append(probs[p - 1])
            ys.append(t - 1)
    return np.asarray(xs).reshape(-1, k), np.asarray(ys, np.int64)


def calibrate(probs: np.ndarray, labels: np.ndarray) -> SplitConformal:
    return SplitConformal(alpha=0.1, score="raps", randomized=True, lam=0.1, k_reg=1).fit(probs, labels)


def main() -> None:
    import torch
    from cellvit_optimus.engine.training.datasets import load_consep
    from cellvit_optimus.engine.pipeline.nuclei import NucleiModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DATA_DIR / "default_nuclei_conformal.json"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "nucleus_conformal.json"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = NucleiModel()
    samples = load_consep()
    per_patch = {s.name: (s.group, *pairs(model, s)) for s in samples}
    cal = [v for v in per_patch.values() if v[0] == CALIBRATION_GROUP]
    p = np.concatenate([c[1] for c in cal])
    y = np.concatenate([c[2] for c in cal])
    cp = calibrate(p, y)
    names = [model.profile.label(i) for i in range(1, model.num_classes + 1)]
    assert model.path is not None
    prov = {"script": "bench/fit_nucleus_conformal.py", "calibration": CALIBRATION_GROUP,
            "patches": len(cal), "nuclei": int(y.size), "per_class": np.bincount(y, minlength=len(names)).tolist(),
            "match": f"IoU >= {MIN_IOU}"}
    atomic_write_bytes(a.out, cp.to_bytes(model_id=model_id(model.path), backbone_id=model.runner.preset.name,
                                          weights_hash=model.runner.weights_id, class_names=names, provenance=prov))

    rng = np.random.default_rng(0)
    covs, sizes = [], []
    for _ in range(200):
        idx = rng.permutation(len(cal))
        fit_on, test_on = idx[: len(cal) // 2], idx[len(cal) // 2:]
        c = calibrate(np.concatenate([cal[i][1] for i in fit_on]), np.concatenate([cal[i][2] for i in fit_on]))
        pt, yt = np.concatenate([cal[i][1] for i in test_on]), np.concatenate([cal[i][2] for i in test_on])
        s = c.predict_sets(pt)
        covs.append(c.coverage(s, yt))
        sizes.append(float(s.sum(1).mean()))
    seen = {}
    for g in sorted({v[0] for v in per_patch.values()} - {CALIBRATION_GROUP}):
        pg = np.concatenate([v[1] for v in per_patch.values() if v[0] == g])
        yg = np.concatenate([v[2] for v in per_patch.values() if v[0] == g])
        s = cp.predict_sets(pg)
        seen[g] = {"nuclei": int(yg.size), "coverage": round(cp.coverage(s, yg), 4),
                   "mean_set_size": round(float(s.sum(1).mean()), 3)}
    s_cal = cp.predict_sets(p)
    res = {"command": "python bench/fit_nucleus_conformal.py", "state": Path(a.out).name, **prov,
           "alpha": cp.alpha, "score": cp.score, "quantile": round(float(cp.quantiles()[0]), 4),
           "class_names": names, "top1_accuracy_heldout": round(float((p.argmax(1) == y).mean()), 4),
           "set_size_histogram_heldout": np.bincount(s_cal.sum(1), minlength=len(names) + 1).tolist(),
           "split_halves": {"splits": 200, "coverage_mean": round(float(np.mean(covs)), 4),
                            "coverage_sd": round(float(np.std(covs)), 4),
                            "mean_set_size": round(float(np.mean(sizes)), 3)},
           "training_images_not_exchangeable": seen}
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
