"""Held-out evaluation of nuclei checkpoints against the Otsu + watershed baseline (resolution study).

``python bench/eval_nuclei.py CKPT [CKPT ...] --json OUT.json``: for each checkpoint (each carries its
nuclei MPP) and for the baseline at 0.25 and 0.5 MPP, bPQ / mPQ / mPQ+ / Dice / AJI / detection F1 and
per-class PQ and F_c on the held-out images of bench/train_default_nuclei.py, per source (CoNSeP test
images whole, 1000x1000, as HoVer-Net scores them; scored at the images' own 0.25 MPP grid), beside
HoVer-Net's published CoNSeP figures, and the nuclei path's tiles/s and image area/s on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nuclei_baseline import otsu_watershed  # noqa: E402
from train_default_nuclei import HELD_OUT, splits  # noqa: E402

from cellvit_optimus.engine.pipeline.nuclei import NucleiModel, segment_image  # noqa: E402
from cellvit_optimus.engine.training.scoring import score_predictions  # noqa: E402


#: HoVer-Net's published figures (Graham et al. 2019, Table 2/4): CoNSeP test (14 images, whole) and
#: Kumar/MoNuSeg test; class F_c on CoNSeP with the merged classes
PUBLISHED = {"hovernet": {"consep": {"pq": 0.547, "f1_det": 0.748, "dice": 0.853, "aji": 0.571,
                                     "f_c": {"other": 0.426, "inflammatory": 0.631, "epithelial": 0.635,
                                             "spindle-shaped": 0.566}},
                          "monuseg_kumar": {"pq": 0.597, "dice": 0.826, "aji": 0.618}}}


def baseline(samples, mpp: float) -> dict:
    from PIL import Image

    preds, t = [], time.perf_counter()
    for s in samples:
        sc = s.mpp / mpp
        if abs(sc - 1) < 0.05:
            preds.append(otsu_watershed(s.image, s.mpp))
            continue
        h, w = s.inst_map.shape
        small = np.asarray(Image.fromarray(s.image).resize((round(w * sc), round(h * sc)), Image.Resampling.BOX))
        lab = otsu_watershed(small, mpp)
        preds.append(np.asarray(Image.fromarray(lab).resize((w, h), Image.Resampling.NEAREST)))
    r = score_predictions(samples, preds, None, 4)
    r["seconds"] = round(time.perf_counter() - t, 2)
    return r


if __name__ == "__main__":
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _, _, test = splits()
    parts = {"all": test, "consep": [s for s in test if s.source == "consep"],
             "monuseg": [s for s in test if s.source == "monuseg"]}
    out: dict = {"held_out": list(HELD_OUT), "published": PUBLISHED, "machine": {"cpu": platform.processor() or platform.machine(),
                                                         "threads": a.threads}, "results": {}}
    for mpp in (0.25, 0.5):
        out["results"][f"baseline@{mpp}"] = {k: baseline(v, mpp) for k, v in parts.items()}
        print(f"baseline@{mpp}", json.dumps(out["results"][f"baseline@{mpp}"]), flush=True)
    for ck in a.checkpoints:
        m = NucleiModel(ck)
        preds = [segment_image(s.image, s.mpp, m) for s in test]
        res = {}
        for k, v in parts.items():
            sel = [preds[test.index(s)] for s in v]
            res[k] = score_predictions(v, [p.inst_map for p in sel], [p.types_lut for p in sel], m.num_classes)
        tiles = sum(p.tiles for p in preds)
        secs = sum(p.seconds for p in preds)
        area = sum(s.image.shape[0] * s.image.shape[1] * (s.mpp ** 2) for s in test) / 1e6  # mm^2
        res["speed"] = {"tiles": tiles, "seconds": round(secs, 1), "tiles_per_s": round(tiles / secs, 3),
                        "mm2_per_min": round(area / secs * 60, 4)}
        out["results"][f"{Path(ck).name}@{m.nuclei_mpp}"] = res
        print(Path(ck).name, m.nuclei_mpp, json.dumps(res), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
