"""Where a nuclei checkpoint loses nuclei: missed, merged with a neighbour, or outlined badly.

``python bench/nuclei_error_analysis.py [CKPT] [--json OUT.json]``: segments the *validation* images
of bench/train_default_nuclei.py (never a held-out one: ``splits(held_out=False)``) as the engine
does (:func:`segment_image`, the checkpoint's post-processing) and sorts every annotated nucleus,
per source and per class:

- ``found``: a predicted nucleus overlaps it with IoU > 0.5 (PQ's match);
- ``missed``: under 30 % of its pixels are inside any predicted nucleus;
- ``merged``: its best-overlapping prediction has more than 30 % of its own pixels on other annotated
  nuclei (one prediction for several nuclei: what better HV maps separate);
- ``other``: covered but not matched (split, or outlined too large or too small).

Fractions are of the annotated nuclei of that class; the areas are medians in um^2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cellvit_optimus.engine.pipeline.nuclei import NucleiModel, segment_image
from train_default_nuclei import splits

#: CoNSeP's merged classes (type ids 1..4 of the CoNSeP profile)
CONSEP_CLASSES = ("other", "inflammatory", "epithelial", "spindle-shaped")
MISSED_BELOW = 0.3
MERGED_ABOVE = 0.3


def classify(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, outcome, area) of each annotated nucleus of ``true``; outcome 0 found, 1 missed, 2 merged,
    3 other (see the module docstring). Both maps are ``(H, W)`` int labels, 0 background."""
    t = true.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    ids, t_area = np.unique(t[t > 0], return_counts=True)
    p_ids, p_area = np.unique(p[p > 0], return_counts=True)
    p_area_of = dict(zip(p_ids.tolist(), p_area.tolist(), strict=True))
    both = (t > 0) & (p > 0)
    base = int(p.max()) + 1  # (true id, pred id) pairs as one integer each
    pairs, inter = np.unique(t[both] * base + p[both], return_counts=True)
    pt, pp = pairs // base, pairs % base
    # each prediction's pixels on annotated nuclei, to tell a merge from a loose outline
    on_true = {int(k): int(v) for k, v in zip(*np.unique(p[both], return_counts=True), strict=True)}
    overlap = {(g, q): n for g, q, n in zip(pt.tolist(), pp.tolist(), inter.tolist(), strict=True)}
    outcome = np.zeros(len(ids), np.int8)
    row = {int(g): i for i, g in enumerate(ids)}
    best_iou = np.zeros(len(ids))
    best_pred = np.zeros(len(ids), np.int64)
    covered = np.zeros(len(ids), np.int64)
    for g, q, n in zip(pt.tolist(), pp.tolist(), inter.tolist(), strict=True):
        i = row[g]
        covered[i] += n
        iou = n / (t_area[i] + p_area_of[q] - n)
        if iou > best_iou[i]:
            best_iou[i], best_pred[i] = iou, q
    for i in range(len(ids)):
        if best_iou[i] > 0.5:
            continue
        if covered[i] < MISSED_BELOW * t_area[i]:
            outcome[i] = 1
            continue
        q = int(best_pred[i])
        others = on_true[q] - overlap[(int(ids[i]), q)]  # the prediction's pixels on other nuclei
        outcome[i] = 2 if others > MERGED_ABOVE * p_area_of[q] else 3
    return ids, outcome, t_area


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=None, help="nuclei checkpoint (default: the bundled one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _, val, _ = splits(held_out=False)
    model = NucleiModel(a.checkpoint)
    names = ("found", "missed", "merged", "other")
    path = Path(model.path).resolve()
    root = Path(__file__).resolve().parents[1]
    report: dict = {"checkpoint": str(path.relative_to(root) if path.is_relative_to(root) else path), "images": [s.group for s in val], "sources": {}}
    rows: dict[tuple[str, str], list] = {}
    for s in val:
        pred = segment_image(s.image, s.mpp, model).inst_map
        ids, outcome, area = classify(s.inst_map, pred)
        src = s.group.split("/")[0]
        if s.type_map is not None and src == "consep":
            types = np.array([int(np.bincount(s.type_map[s.inst_map == g]).argmax()) for g in ids])
            labels = [CONSEP_CLASSES[k - 1] if 1 <= k <= 4 else "untyped" for k in types]
        else:
            labels = ["all"] * len(ids)
        for lab, o, ar in zip(labels, outcome, area, strict=True):
            rows.setdefault((src, lab), []).append((int(o), float(ar) * s.mpp ** 2))
        if src == "consep":
            for o, ar in zip(outcome, area, strict=True):
                rows.setdefault((src, "all"), []).append((int(o), float(ar) * s.mpp ** 2))
        print(f"{s.group}: {len(ids)} nuclei", flush=True)
    for (src, lab), r in sorted(rows.items()):
        o = np.array([x[0] for x in r])
        ar = np.array([x[1] for x in r])
        entry = {"n": len(r), **{k: round(float((o == i).mean()), 3) for i, k in enumerate(names)},
                 "median_area_um2_found": round(float(np.median(ar[o == 0])), 1) if (o == 0).any() else None,
                 "median_area_um2_lost": round(float(np.median(ar[o > 0])), 1) if (o > 0).any() else None}
        report["sources"].setdefault(src, {})[lab] = entry
        print(f"{src:8s} {lab:15s} " + " ".join(f"{k} {v}" for k, v in entry.items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
