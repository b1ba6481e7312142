"""Real-data fixtures of the safety tests: a CoNSeP nucleus-type problem and H&E tile features.

The nucleus-type problem stands in for the NT head until it exists: hand-made per-nucleus features
(colour inside the nucleus and in a ring around it, size, shape, texture) from the real CoNSeP
images and instance maps, labelled with the merged CoNSeP types, with whole CoNSeP source images
held out. The tile features stand in for backbone embeddings in the OOD tests.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cellvit_optimus.engine.training.datasets import load_consep

# the real-tile helpers of the OOD tests (ood_tiles.py) live beside them; bench/ scripts import them too
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: the CoNSeP source images held out from training the nucleus-type classifier
HELD_OUT_GROUPS = ("consep/test_4", "consep/test_5")


def _report(key: str, value: object) -> None:
    print(f"[safety-report] {key}: {value}")
    path = os.environ.get("OPTIMUS_SAFETY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({key: value}) + "\n")


@pytest.fixture(scope="session")
def report():
    """print a measured number (visible with ``-s``) and append it to $OPTIMUS_SAFETY_REPORT if set."""
    return _report


def nucleus_features(image: np.ndarray, inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """per-nucleus features ``(N, 18)`` and the instance ids ``(N,)`` they belong to."""
    ids = np.unique(inst)
    ids = ids[ids > 0]
    rgb = image.astype(np.float64)
    od = -np.log((rgb + 1.0) / 256.0)
    ones = np.ones(inst.shape)
    area = ndimage.sum(ones, inst, ids)
    f: list[np.ndarray] = []
    for c in range(3):
        f += [ndimage.mean(rgb[..., c], inst, ids), ndimage.standard_deviation(rgb[..., c], inst, ids),
              ndimage.mean(od[..., c], inst, ids)]
    yy, xx = np.mgrid[: inst.shape[0], : inst.shape[1]].astype(np.float64)
    mx, my = ndimage.mean(xx, inst, ids), ndimage.mean(yy, inst, ids)
    mxx = ndimage.mean(xx**2, inst, ids) - mx**2
    myy = ndimage.mean(yy**2, inst, ids) - my**2
    mxy = ndimage.mean(xx * yy, inst, ids) - mx * my
    tr, det = mxx + myy, mxx * myy - mxy**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 0)
    ecc = np.sqrt(1 - (l2 + 1e-6) / (l1 + 1e-6))
    ring = np.where(inst == 0, ndimage.grey_dilation(inst, size=9), 0)  # context around each nucleus
    with np.errstate(invalid="ignore", divide="ignore"):
        for c in range(3):
            f.append(ndimage.mean(rgb[..., c], ring, ids))
    perim = ndimage.sum((inst != ndimage.grey_erosion(inst, size=3)).astype(float), inst, ids)
    g = rgb.mean(-1)
    grad = np.hypot(ndimage.sobel(g, 0), ndimage.sobel(g, 1))
    f += [np.log(area), ecc, np.log((l1 + 1) / (l2 + 1)), perim**2 / area, ndimage.mean(grad, inst, ids),
          ndimage.sum(ones, ring, ids) / area]
    return np.nan_to_num(np.stack(f, 1)), ids


@dataclass(frozen=True)
class NucleusProblem:
    x: np.ndarray  # (N, 18) features
    y: np.ndarray  # (N,) type 0..3 (other, inflammatory, epithelial, spindle-shaped)
    group: np.ndarray  # (N,) CoNSeP source image

    @property
    def held_out(self) -> np.ndarray:
        return np.isin(self.group, HELD_OUT_GROUPS)


@pytest.fixture(scope="session")
def consep_samples(nuclei_dir):
    return load_consep(nuclei_dir)


@pytest.fixture(scope="session")
def nucleus_problem(consep_samples) -> NucleusProblem:
    xs, ys, gs = [], [], []
    for s in consep_samples:
        x, ids = nucleus_features(s.image, s.inst_map)
        xs.append(x)
        ys.append(ndimage.maximum(s.type_map, s.inst_map, ids).astype(np.int64) - 1)
        gs += [s.group] * len(ids)
    prob = NucleusProblem(np.concatenate(xs), np.concatenate(ys), np.array(gs))
    assert set(np.unique(prob.y)) == {0, 1, 2, 3}
    assert not set(prob.group[~prob.held_out]) & set(prob.group[prob.held_out])
    return prob


@pytest.fixture(scope="session")
def heldout_type_probs(nucleus_problem):
    """(probabilities, labels) of a logistic-regression nucleus typer on the held-out CoNSeP images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = nucleus_problem
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(p.x[~p.held_out], p.y[~p.held_out])
    return clf.predict_proba(p.x[p.held_out]), p.y[p.held_out]


# --- tile features (stand-in for backbone embeddings) ------------------------------------------

# Ruifrok & Johnston stain OD vectors (haematoxylin, eosin, DAB), as used by scikit-image's rgb2hed
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_INV = np.linalg.inv(_HED / np.linalg.norm(_HED, axis=1, keepdims=True))


@pytest.fixture(scope="session")
def tiler():
    return tiles_of


def tile_features(tiles: list[np.ndarray]) -> np.ndarray:
    """deterministic colour/stain/sharpness statistics of RGB tiles, ``(N, 29)``."""
    out = []
    for im in tiles:
        rgb = im.astype(np.float64)
        od = -np.log10(np.clip(rgb[::2, ::2], 1, 255) / 255.0).reshape(-1, 3)
        hed = od @ _HED_INV
        f: list[float] = []
        for c in range(3):
            f += list(np.percentile(od[:, c], [10, 50, 90])) + [float(od[:, c].std())]
        for c in range(3):
            f += list(np.percentile(hed[:, c], [50, 90, 99]))
        tot = od.sum(1)
        stained = tot > 0.2
        f.append(float(stained.mean()))
        chrom = (od[stained] / tot[stained, None]).mean(0) if stained.sum() > 10 else np.full(3, 1 / 3)
        f += list(chrom)
        g = rgb.mean(-1)
        lap_var = ndimage.laplace(g).var()
        grad = np.hypot(ndimage.sobel(g, 0), ndimage.sobel(g, 1)).mean()
        # absolute and contrast-normalised sharpness: blur lowers both, faint tissue only the first
        f += [np.log(lap_var + 1), np.log(grad + 1), np.log((lap_var + 1) / (g.var() + 1)),
              np.log((grad + 1) / (g.std() + 1))]
        out.append(f)
    return np.asarray(out)


@pytest.fixture(scope="session")
def tile_featurizer():
    return tile_features


def tiles_of(img: np.ndarray, size: int = 128, step: int | None = None) -> list[np.ndarray]:
    step = step or size
    h, w = img.shape[:2]
    return [img[y : y + size, x : x + size] for y in range(0, h - size + 1, step)
            for x in range(0, w - size + 1, step)]
