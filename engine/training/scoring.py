"""Scoring nuclei models on annotated images: bPQ, mPQ / mPQ+, Dice, AJI, detection F1 and HoVer-Net's
per-class F_c, for training's validation, post-processing tuning and the bench's held-out evaluation.

Moved from the runtime wing (``engine.pipeline.nuclei``, issue 31): nothing at run time scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.pipeline import DEFAULT_OVERLAP, NucleiModel, PostProcessConfig, segment_image
from cellvit_optimus.engine.settings import REFERENCE_MPP

__all__ = ("evaluate", "score_predictions")


def evaluate(model: NucleiModel, samples: Sequence[Any], post: PostProcessConfig | None = None,
             overlap: int = DEFAULT_OVERLAP) -> JsonDict:
    """bPQ, mPQ (over samples with types), Dice, AJI and detection F1 of ``model`` on annotated samples
    (``engine.datasets.NucleiSample``), scored at the samples' own resolution; plus tiles/s."""
    preds, n_tiles, secs = [], 0, 0.0
    for s in samples:
        r = segment_image(s.image, s.mpp, model, overlap=overlap, post=post)
        preds.append(r)
        n_tiles += r.tiles
        secs += r.seconds
    return {**score_predictions(samples, [p.inst_map for p in preds], [p.types_lut for p in preds],
                                model.profile.num_classes),
            "tiles": n_tiles, "seconds": round(secs, 2), "tiles_per_s": round(n_tiles / secs, 3) if secs else None,
            "nuclei_mpp": model.nuclei_mpp}


def _centroids(inst: np.ndarray) -> np.ndarray:
    ids = np.unique(inst)
    ids = ids[ids > 0]
    if ids.size == 0:
        return np.zeros((0, 2))
    lut = np.zeros(int(inst.max()) + 1, np.int64)
    lut[ids] = np.arange(ids.size)
    yy, xx = np.nonzero(inst)
    k = lut[inst[yy, xx]]
    n = np.bincount(k, minlength=ids.size)
    return np.stack([np.bincount(k, xx, ids.size) / n + 0.5, np.bincount(k, yy, ids.size) / n + 0.5], axis=1)


def score_predictions(samples: Sequence[Any], pred_maps: Sequence[np.ndarray],
                      pred_types: Sequence[np.ndarray] | None, num_classes: int) -> JsonDict:
    """The metrics of :func:`evaluate` for given predictions (used for baselines too).

    ``bpq`` / ``dice`` / ``aji``: per-image means; ``mpq``: PanNuke-style over the samples with types,
    ``mpq_plus``: CoNIC's pooled mPQ+ over them (``per_class`` has both per class, ``pq`` / ``pq_plus``);
    ``f1_det``: detection F1 with centroids paired within 12 px at 0.25 MPP (6 at 0.5; HoVer-Net),
    counts pooled over the images.
    """
    from cellvit_optimus.kernels import aji, bpq, detection_scores, dice, instance_types, mpq

    trues = [np.asarray(s.inst_map) for s in samples]
    preds = [np.asarray(p) for p in pred_maps]
    typed = [i for i, s in enumerate(samples) if s.type_map is not None]
    tp = fp = fn = 0
    for s, t, p in zip(samples, trues, preds):
        d = detection_scores(_centroids(t), _centroids(p), radius=12.0 * REFERENCE_MPP / s.mpp)
        tp, fp, fn = tp + d.tp, fp + d.fp, fn + d.fn
    res: JsonDict = {
        "n_images": len(samples),
        "bpq": round(bpq(trues, preds), 4),
        "mpq": None,
        "dice": round(float(np.mean([dice(t, p) for t, p in zip(trues, preds)])), 4),
        "aji": round(float(np.mean([aji(t, p) for t, p in zip(trues, preds)])), 4),
        "f1_det": round(2 * tp / (2 * tp + fp + fn), 4) if (tp + fp + fn) else 1.0,
        "precision_det": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall_det": round(tp / (tp + fn), 4) if tp + fn else None,
    }
    if typed and pred_types is not None:
        tt = [trues[i] for i in typed]
        pp = [preds[i] for i in typed]
        true_luts = [instance_types(trues[i], samples[i].type_map) for i in typed]
        pred_luts = [np.asarray(pred_types[i]) for i in typed]
        res["mpq"] = round(mpq(tt, pp, true_luts, pred_luts, classes=range(1, num_classes + 1)), 4)
        # CoNIC's mPQ+: each class's matches pooled over the images, then the classes averaged
        res["mpq_plus"] = round(mpq(tt, pp, true_luts, pred_luts, classes=range(1, num_classes + 1),
                                    mode="aggregate"), 4)
        res["per_class"] = _per_class(tt, pp, true_luts, pred_luts, [samples[i].mpp for i in typed], num_classes)
    return res


def _per_class(trues: Sequence[np.ndarray], preds: Sequence[np.ndarray], true_luts: Sequence[np.ndarray],
               pred_luts: Sequence[np.ndarray], mpps: Sequence[float], num_classes: int) -> JsonDict:
    """Per class id: ground-truth count, recall (found *and* given this class), HoVer-Net F_c and PQ."""
    from cellvit_optimus.kernels import detection_scores, mpq, pair_centroids

    def ids_types(inst: np.ndarray, lut: np.ndarray) -> np.ndarray:
        ids = np.unique(inst)
        ids = ids[ids > 0]
        return lut[ids] if ids.size else np.zeros(0, np.int64)

    found = np.zeros(num_classes + 1, np.int64)
    total = np.zeros(num_classes + 1, np.int64)
    ta, pa, tt, pt = [], [], [], []
    for t, p, tl, pl, mpp in zip(trues, preds, true_luts, pred_luts, mpps):
        txy, pxy = _centroids(t), _centroids(p)
        ttyp, ptyp = ids_types(t, tl), ids_types(p, pl)
        pairs, _, _ = pair_centroids(txy, pxy, 12.0 * REFERENCE_MPP / mpp)
        total += np.bincount(ttyp, minlength=num_classes + 1)[: num_classes + 1]
        ok = ttyp[pairs[:, 0]][ttyp[pairs[:, 0]] == ptyp[pairs[:, 1]]]
        found += np.bincount(ok, minlength=num_classes + 1)[: num_classes + 1]
        ta.append(txy)
        pa.append(pxy)
        tt.append(ttyp)
        pt.append(ptyp)
    # one radius for the F_c pooling: the samples of one evaluation share a resolution
    f_c = detection_scores(ta, pa, tt, pt, radius=12.0 * REFERENCE_MPP / float(np.mean(mpps)),
                           classes=range(1, num_classes + 1)).type_f1
    out: JsonDict = {}
    for c in range(1, num_classes + 1):
        pq_c = mpq(trues, preds, true_luts, pred_luts, classes=[c])
        pq_plus = mpq(trues, preds, true_luts, pred_luts, classes=[c], mode="aggregate")
        out[str(c)] = {"n_true": int(total[c]),
                       "recall": round(float(found[c] / total[c]), 4) if total[c] else None,
                       "f1": round(float(f_c[c]), 4) if np.isfinite(f_c[c]) else None,
                       "pq": round(float(pq_c), 4) if np.isfinite(pq_c) else None,
                       "pq_plus": round(float(pq_plus), 4) if np.isfinite(pq_plus) else None}
    return out
