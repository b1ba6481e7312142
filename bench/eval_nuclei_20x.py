"""Held-out nuclei scores on simulated 20x scans: does a checkpoint's lead on 40x images carry over?

``python bench/eval_nuclei_20x.py [CKPT ...] [--threads 2] [--json OUT]`` (default: the bundled model)

The held-out images (bench/eval_nuclei.py's: CoNSeP test_1..test_5 as whole 1000x1000 images and 3
MoNuSeg images, all 40x) are box-downsampled 2x, which is about what a 20x scanner records (0.5 um/px);
the ground truth is subsampled alike (every second pixel, instances renumbered). Each checkpoint segments them as the
engine would (:func:`segment_image` resamples to the checkpoint's own resolution and maps back), and
is scored per source at 0.5 um/px beside the Otsu baseline. A 0.25 um/px checkpoint therefore sees
upsampled tiles here, as it would on a 20x slide such as the bundled one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cellvit_optimus.engine.pipeline.nuclei import NucleiModel, segment_image
from cellvit_optimus.engine.training.scoring import score_predictions
from nuclei_baseline import otsu_watershed
from train_default_nuclei import splits


def as_20x(sample):
    """the sample as a 20x scan: image box-downsampled 2x, ground truth subsampled and renumbered"""
    from PIL import Image

    h, w = sample.image.shape[:2]
    img = np.asarray(Image.fromarray(sample.image).resize((w // 2, h // 2), Image.Resampling.BOX))
    inst = sample.inst_map[:h // 2 * 2:2, :w // 2 * 2:2]
    inst = np.unique(inst, return_inverse=True)[1].reshape(inst.shape).astype(np.int32)
    types = None if sample.type_map is None else sample.type_map[:h // 2 * 2:2, :w // 2 * 2:2]
    return replace(sample, image=img, inst_map=inst, type_map=types, mpp=sample.mpp * 2)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the scores here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sim = [as_20x(s) for s in splits()[2]]
    out: dict[str, dict] = {}
    for ckpt in a.checkpoints or [None]:
        model = NucleiModel(ckpt)
        name = f"{Path(ckpt).name if ckpt else 'bundled'}@{model.nuclei_mpp}"
        preds = [segment_image(s.image, s.mpp, model) for s in sim]
        for src in ("consep", "monuseg"):
            idx = [i for i, s in enumerate(sim) if s.source == src]
            r = score_predictions([sim[i] for i in idx], [preds[i].inst_map for i in idx],
                                  [preds[i].types_lut for i in idx], 4)
            out.setdefault(name, {})[src] = {k: r.get(k) for k in ("bpq", "mpq", "mpq_plus", "f1_det")}
    for src in ("consep", "monuseg"):
        ss = [s for s in sim if s.source == src]
        r = score_predictions(ss, [otsu_watershed(s.image, s.mpp) for s in ss], None, 4)
        out.setdefault("otsu", {})[src] = {k: r[k] for k in ("bpq", "f1_det")}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
