"""Fit the bundled default OOD state, ``engine/data/default_ood.npz``, for the bundled nuclei model.

``python bench/fit_default_ood.py [--out PATH] [--threads 1]``

Reference: the real in-domain H&E tiles of ``tests/safety/ood_tiles.py`` at the model's 0.5 um/px
(the MoNuSeg training images + the TIAToolbox target image, 4 x 4 tiles each; the tissue tiles of
CMU-1-Small-Region and of the TCGA frozen section on the triage engine's own grid) **without the
nuclei model's held-out images** (``train_default_nuclei.HELD_OUT``: three MoNuSeg images, never
opened here; issue 27), scored with the bundled model's backbone and the product's tile statistics
(recipe ``embedding+tile_stats/1``, :mod:`cellvit_optimus.safety.ood_features`). Thresholds are the
0.95 / 0.99 quantiles of distances cross-fitted leaving one group out (each image / slide quadrant
is scored by a fit that never saw it): with five random folds the thresholds depended on which
images shared a fold, and on 390 reference tiles the 0.995 quantile rests on their top two scores
(docs/model.md, "OOD reference without the held-out images").
The state records the backbone id and weights hash (a mismatched backbone is refused), the recipe,
the tile resolution and this provenance. Deterministic: a rerun writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "safety"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import ood_tiles
from train_default_nuclei import HELD_OUT
from cellvit_optimus.engine.data import DATA_DIR
from cellvit_optimus.engine.io import atomic_write_bytes
from cellvit_optimus.safety import MahalanobisOOD
from cellvit_optimus.safety.ood_features import EMBEDDING_TILE_STATS


def reference_tiles(shared: Path) -> ood_tiles.TileSet:
    """the reference tiles: every in-domain tile but the nuclei model's held-out images (left unread)"""
    return ood_tiles.in_domain(shared, exclude=HELD_OUT)


def reference_fit(x: np.ndarray, groups: np.ndarray) -> MahalanobisOOD:
    """the detector of the bundled state, fitted on reference features ``x`` with their groups
    (cross-fitted leaving one group out)"""
    if np.isin(groups, HELD_OUT).any():
        raise ValueError("the reference holds tiles of a held-out image")
    return MahalanobisOOD(features=EMBEDDING_TILE_STATS, estimator="ledoit_wolf", review_quantile=0.95,
                          out_quantile=0.99, cv_folds=int(np.unique(groups).size), seed=0).fit(x, groups=groups)


def fit(shared: Path, model=None) -> tuple[MahalanobisOOD, dict]:
    """the fitted detector and its provenance record"""
    from cellvit_optimus.engine.pipeline.nuclei import NucleiModel

    model = model or NucleiModel()
    ind = reference_tiles(shared)
    x = ood_tiles.features(model.runner, ind.tiles)[EMBEDDING_TILE_STATS]
    ood = reference_fit(x, ind.groups)
    ood.tile_mpp = ood_tiles.MPP
    ood.provenance = {
        "script": "bench/fit_default_ood.py",
        "tiles": {str(s): int((ind.sources == s).sum()) for s in np.unique(ind.sources)},
        "groups": int(np.unique(ind.groups).size),
        "tile_size": ood_tiles.TILE,
        "data": "MoNuSeg train (13 less the nuclei model's 3 held-out) + TIAToolbox target image, "
                "CMU-1-Small-Region, TCGA-CR-7395 frozen section",
        "cross_fitting": "leave one group out",
        "model": str(model.path.name) if model.path else None,
    }
    return ood, ood.provenance


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DATA_DIR / "default_ood.npz"))
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from cellvit_optimus.engine.pipeline.nuclei import NucleiModel

    model = NucleiModel()
    ood, prov = fit(Path(a.shared), model)
    atomic_write_bytes(a.out, ood.to_bytes(backbone_id=model.runner.preset.name, weights_hash=model.runner.weights_id))
    t = ood.thresholds
    print(json.dumps({"out": a.out, "bytes": Path(a.out).stat().st_size, "dim": int(ood.shift_.shape[0]),
                      "review": round(t.review, 3), "out_of_domain": round(t.out_of_domain, 3), **prov}, indent=1))


if __name__ == "__main__":
    main()
