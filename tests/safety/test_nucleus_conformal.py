"""The shipped nucleus-type calibration (``engine/data/default_nuclei_conformal.json``) and its wiring.

Calibrated by ``bench/fit_nucleus_conformal.py`` on the bundled model's CoNSeP validation images
(training images it never trained on; never a held-out image); results in
``bench/results/nucleus_conformal.json``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from bench_scripts import bench_script
from cellvit_optimus.engine.errors import StateMismatchError
from cellvit_optimus.safety import SplitConformal, TagThresholds, TileSignals, tag_tiles, type_probabilities

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / "engine" / "data" / "default_nuclei_conformal.json"
MODEL = REPO / "engine" / "data" / "default_nuclei.safetensors"


def test_shipped_calibration_is_bound_to_model_and_backbone():
    from cellvit_optimus.heads.checkpoint import read_metadata

    mid = hashlib.sha256(MODEL.read_bytes()).hexdigest()[:16]
    wh = read_metadata(MODEL)["backbone_hash"]  # the embedded, trained backbone's hash
    assert wh.startswith("sha256:")
    cp = SplitConformal.load(STATE, model_id=mid, backbone_id="tiny", weights_hash=wh)
    assert cp.n_classes == 4 and cp.class_names == ["other", "inflammatory", "epithelial", "spindle-shaped"]
    val = bench_script("train_default_nuclei").VAL
    assert sorted(cp.provenance["calibration"]) == sorted(g for g in val if g.startswith("consep/"))
    assert cp.cal_scores.size == cp.provenance["nuclei"]
    with pytest.raises(StateMismatchError, match="model_id"):
        SplitConformal.load(STATE, model_id="0" * 16)
    with pytest.raises(StateMismatchError, match="backbone_id='tiny'.*'small'"):
        SplitConformal.load(STATE, model_id=mid, backbone_id="small")
    with pytest.raises(StateMismatchError, match="weights_hash"):
        SplitConformal.load(STATE, model_id=mid, backbone_id="tiny", weights_hash="sha256:other")


@pytest.mark.slow
def test_calibration_reproduces_and_covers_unseen_nuclei(report):
    pytest.importorskip("torch")
    from cellvit_optimus.engine.pipeline.nuclei import NucleiModel

    mod = bench_script("fit_nucleus_conformal")
    model = NucleiModel()
    got = [mod.pairs(model, s, with_quadrant=True) for s in mod.calibration_samples()]
    p, y = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    grp = np.concatenate([i * 4 + g[2] for i, g in enumerate(got)])
    shipped = SplitConformal.load(STATE)
    np.testing.assert_array_equal(y, shipped.cal_labels)
    np.testing.assert_allclose(mod.calibrate(p, y).cal_scores, shipped.cal_scores, rtol=1e-4, atol=1e-6)
    # coverage on nuclei the calibration did not see: calibrate on half the image quadrants, measure on
    # the other half
    rng = np.random.default_rng(1)
    cov, size = [], []
    ids = np.unique(grp)
    for _ in range(100):
        on = np.isin(grp, rng.permutation(ids)[: ids.size // 2])
        cp = mod.calibrate(p[on], y[on])
        sets = cp.predict_sets(p[~on])
        cov.append(cp.coverage(sets, y[~on]))
        size.append(sets.sum(1).mean())
    report("nucleus conformal quadrant halves", {"coverage": round(float(np.mean(cov)), 3),
                                                 "mean_set_size": round(float(np.mean(size)), 3)})
    assert 0.85 <= np.mean(cov) <= 1.0  # target 0.90


def test_type_probabilities_and_nan_set_sizes_are_not_judged():
    s = np.array([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(type_probabilities(s), [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"\(N, K \+ 1\)"):
        type_probabilities(np.zeros(3))
    d = tag_tiles(TileSignals(nucleus_set_size=np.array([np.nan, 2.0, 1.0])), TagThresholds(require_ood=False))
    assert [x.tag.value for x in d] == ["reliable", "review", "reliable"]  # NaN: a tile without nuclei
    assert "mean nucleus-type set size 2.00 > 1.25" in d[1].reason
