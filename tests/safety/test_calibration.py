"""Temperature scaling on a real validation split of CoNSeP nucleus types."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cellvit_optimus.engine.errors import ConfigError, StateMismatchError
from cellvit_optimus.engine.io import atomic_write_bytes
from cellvit_optimus.safety import TemperatureScaler, calibration_errors, reliability_diagram


@pytest.fixture(scope="module")
def overconfident_logits(nucleus_problem):
    """held-out logits of a deliberately sharpened nucleus typer (logistic regression with almost
    no regularisation, C=1e4): confident beyond its accuracy on the unseen CoNSeP images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = nucleus_problem
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1e4, max_iter=5000))
    clf.fit(p.x[~p.held_out], p.y[~p.held_out])
    return clf.decision_function(p.x[p.held_out]), p.y[p.held_out]


def _r(x) -> float:
    return round(float(x), 4)


def test_temperature_scaling_lowers_ece(overconfident_logits, tmp_path, report):
    logits, labels = overconfident_logits
    n = labels.size
    eces = []
    for s in range(20):  # 20 random calibration/validation splits of the held-out images
        idx = np.random.default_rng(s).permutation(n)
        cal, val = idx[: n // 2], idx[n // 2 :]
        ts = TemperatureScaler().fit(logits[cal], labels[cal])
        raw = TemperatureScaler().transform(logits[val])  # T = 1: the model's own probabilities
        before = calibration_errors(raw, labels[val])
        after = calibration_errors(ts.transform(logits[val]), labels[val])
        nll_b = TemperatureScaler.nll(logits[val], labels[val])
        nll_a = TemperatureScaler.nll(logits[val], labels[val], ts.temperature)
        eces.append((before.ece, after.ece, before.mce, after.mce, nll_b, nll_a, ts.temperature))
        if s == 0:
            png_b = reliability_diagram(raw, labels[val], tmp_path / "before.png", title="before")
            png_a = reliability_diagram(ts.transform(logits[val]), labels[val], tmp_path / "after.png",
                                        title=f"T={ts.temperature:.2f}")
            assert png_b.ece == pytest.approx(before.ece) and png_a.ece == pytest.approx(after.ece)
    e = np.array(eces)
    report("temperature_scaling (LR C=1e4, 20 splits)", {
        "ece_before": _r(e[:, 0].mean()), "ece_after": _r(e[:, 1].mean()),
        "mce_before": _r(e[:, 2].mean()), "mce_after": _r(e[:, 3].mean()),
        "nll_before": _r(e[:, 4].mean()), "nll_after": _r(e[:, 5].mean()),
        "temperature": _r(e[:, 6].mean())})
    assert e[:, 6].min() > 1.0  # over-confident model: the fitted temperature softens it
    assert (e[:, 1] < e[:, 0]).all()  # ECE lower on every validation split
    assert e[:, 1].mean() < 0.7 * e[:, 0].mean()
    assert (e[:, 5] < e[:, 4]).all()  # and so is the validation NLL
    for name in ("before.png", "after.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_well_calibrated_model_keeps_temperature_near_one(heldout_type_probs, report):
    probs, labels = heldout_type_probs
    ts = TemperatureScaler().fit(np.log(probs[::2]), labels[::2])
    report("temperature (logistic regression)", round(ts.temperature, 3))
    assert 0.7 < ts.temperature < 2.0


def test_ece_mce_known_values():
    # 4 predictions of confidence 0.8, 3 correct: one bin, gap |0.75 - 0.8|
    probs = np.array([[0.8, 0.2]] * 4)
    labels = np.array([0, 0, 0, 1])
    rep = calibration_errors(probs, labels, n_bins=10)
    assert rep.ece == pytest.approx(0.05) and rep.mce == pytest.approx(0.05)
    assert rep.count.sum() == 4


def test_save_load_mismatch(tmp_path):
    path = tmp_path / "temperature.json"
    atomic_write_bytes(path, TemperatureScaler(1.7).to_bytes(model_id="nt-v1", backbone_id="vit-s16"))
    assert TemperatureScaler.load(path, model_id="nt-v1", backbone_id="vit-s16").temperature == 1.7
    with pytest.raises(StateMismatchError, match="model_id='nt-v1'.*model_id='nt-v2'"):
        TemperatureScaler.load(path, model_id="nt-v2")
    with pytest.raises(ConfigError, match="temperature=-1"):
        TemperatureScaler(-1.0)
