"""Safety scoring of a slide's tiles beside plain baselines, in tiles/s.

- ``safety-ood``: :meth:`MahalanobisOOD.score` (one einsum over the batch) vs scikit-learn's
  ``EmpiricalCovariance.mahalanobis`` given the same location and precision (same distances, checked)
- ``safety-conformal``: :meth:`SplitConformal.predict_sets` (vectorised RAPS) vs a per-tile Python loop
  computing the same randomised scores (same sets, checked)
- ``safety-tags``: :func:`tag_all` (tile rule with reasons, 8-connected regions, slide) vs the tile rule
  alone as numpy masks without reasons: a floor showing what the per-tile Python loop and its reason
  strings cost (same tile tags, checked)

- ``safety-ood-features``: :func:`tile_statistics` (the stain/sharpness half of the engine's OOD feature,
  batched numpy) vs the same statistics tile by tile with scipy (``tile_features`` of the safety tests,
  the first version), on real 224 px tiles of the bundled slide; the engine pays this per tile

Embeddings are correlated Gaussians (D=384, the tiny backbone's width) with a shifted tail so that
some tiles go to review or out of domain; timing does not depend on their content. N=8192 tiles (a
large slide at 0.5 um/px), 512 under ``--benchmark-disable``.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchutil import record, smoke
from cellvit_optimus.safety import MahalanobisOOD, SplitConformal, TagThresholds, TileSignals, tag_all

D, K = 384, 6


def _embeddings(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(D, D)) / np.sqrt(D)
    z = rng.normal(size=(n, D)) @ mix
    z[: n // 20] += 3.0  # a shifted tail: review / out-of-domain tiles
    return z


@pytest.fixture(scope="module")
def ood():
    return MahalanobisOOD(cv_folds=2).fit(_embeddings(2000, 0)[100:])


def _probs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, K)) * 2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(K, p=row) for row in p])
    return p, y


@pytest.mark.benchmark(group="safety-ood")
@pytest.mark.parametrize("impl", ["optimus", "sklearn-empirical-covariance"])
def test_ood_score(benchmark, ood, impl):
    n = smoke(benchmark, 8192, 512)
    x = _embeddings(n, 1)
    ref = ood.score(x)
    if impl == "optimus":
        got = benchmark.pedantic(lambda: ood.score(x), rounds=5, warmup_rounds=1)
    else:
        from sklearn.covariance import EmpiricalCovariance

        est = EmpiricalCovariance()
        est.location_, est.precision_ = ood.means_[0], ood.precisions_[0]

        def run():
            z = (np.asarray(x, np.float64) - ood.shift_) / ood.scale_
            return np.sqrt(np.maximum(est.mahalanobis(z), 0))

        got = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    benchmark.extra_info.update(impl=impl, dim=D)
    record(benchmark, tiles=n)


def naive_sets(cp: SplitConformal, probs: np.ndarray, stream: int = 1) -> np.ndarray:
    """RAPS prediction sets tile by tile (what a straightforward implementation does)"""
    q = cp.quantiles()
    u = cp._uniforms(probs.shape[0], stream)
    out = np.zeros(probs.shape, bool)
    for i in range(probs.shape[0]):
        order = sorted(range(K), key=lambda k: -probs[i, k])
        before = 0.0
        for rank, k in enumerate(order, start=1):
            e = before + u[i] * probs[i, k] + cp.lam * max(0, rank - cp.k_reg)
            out[i, k] = e <= q[k]
            before += probs[i, k]
        out[i, order[0]] = True
    return out


@pytest.mark.benchmark(group="safety-conformal")
@pytest.mark.parametrize("impl", ["optimus", "naive-loop"])
def test_conformal_sets(benchmark, impl):
    n = smoke(benchmark, 8192, 512)
    cal_p, cal_y = _probs(2000, 0)
    cp = SplitConformal(alpha=0.1).fit(cal_p, cal_y)
    p, _ = _probs(n, 1)
    ref = cp.predict_sets(p)
    if impl == "optimus":
        got = benchmark.pedantic(lambda: cp.predict_sets(p), rounds=5, warmup_rounds=1)
    else:
        got = benchmark.pedantic(lambda: naive_sets(cp, p), rounds=2, warmup_rounds=0)
    assert (got == ref).mean() > 0.999  # ties in sorting may differ on a handful of entries
    benchmark.extra_info.update(impl=impl, classes=K, mean_set_size=round(float(ref.sum(1).mean()), 3))
    record(benchmark, tiles=n)


def vector_tile_tags(s: TileSignals, t: TagThresholds) -> np.ndarray:
    """the tile rule of :func:`tag_tiles` as masks: 0 reliable, 1 review, 2 out of domain (no reasons)"""
    ood = s.ood_score
    review = np.zeros(len(s), bool)
    review |= np.isnan(ood) | (ood > t.ood_review)
    review |= s.set_size > t.max_set_size
    review |= s.set_size < 1
    review |= np.asarray([bool(f) for f in s.quality_flags])
    review |= s.np_entropy > t.np_entropy_max
    review |= s.nt_entropy > t.nt_entropy_max
    review |= s.hv_consistency < t.hv_consistency_min
    out = review.astype(np.int8)
    out[ood > t.ood_out] = 2
    return out


@pytest.mark.benchmark(group="safety-tags")
@pytest.mark.parametrize("impl", ["optimus-tag_all", "numpy-tile-rule-floor"])
def test_tags(benchmark, ood, impl):
    n = smoke(benchmark, 8192, 512)
    rng = np.random.default_rng(2)
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack(np.divmod(np.arange(n), side), 1)[:, ::-1] * 224
    sig = TileSignals(ood_score=ood.score(_embeddings(n, 1)), set_size=rng.integers(1, 4, n).astype(float),
                      np_entropy=rng.random(n) * 0.7, nt_entropy=rng.random(n) * 1.2,
                      hv_consistency=rng.random(n) * 0.2 + 0.8,
                      quality_flags=["blur" if v < 0.02 else "" for v in rng.random(n)])
    thr = TagThresholds().with_ood(ood)
    level = {"reliable": 0, "review": 1, "out_of_domain": 2}
    ref = np.array([level[d.tag.value] for d in tag_all(sig, coords, 224, thr).tiles])
    if impl == "optimus-tag_all":
        res = benchmark.pedantic(lambda: tag_all(sig, coords, 224, thr), rounds=3, warmup_rounds=1)
        benchmark.extra_info["slide_tag"] = res.slide.tag.value
    else:
        got = benchmark.pedantic(lambda: vector_tile_tags(sig, thr), rounds=5, warmup_rounds=1)
        assert np.array_equal(got, ref)
    benchmark.extra_info.update(impl=impl, tag_counts=np.bincount(ref, minlength=3).tolist())
    record(benchmark, tiles=n)


@pytest.fixture(scope="module")
def real_tiles():
    from cellvit_optimus.engine.data import bundled_slide
    from cellvit_optimus.engine.wsi.slide import open_slide

    with open_slide(bundled_slide()) as sl:
        img = sl.read_region((0, 0), 0, sl.dimensions)
    h, w = img.shape[:2]
    return np.stack([img[y:y + 224, x:x + 224] for y in range(0, h - 223, 224) for x in range(0, w - 223, 224)])


@pytest.mark.benchmark(group="safety-ood-features")
@pytest.mark.parametrize("impl", ["optimus-batched", "scipy-per-tile"])
def test_ood_tile_statistics(benchmark, real_tiles, impl):
    from cellvit_optimus.safety import tile_statistics

    n = smoke(benchmark, len(real_tiles), 16)
    tiles = real_tiles[:n]
    if impl == "optimus-batched":
        got = benchmark.pedantic(lambda: tile_statistics(tiles), rounds=3, warmup_rounds=1)
    else:
        import importlib.util
        from pathlib import Path

        spec = importlib.util.spec_from_file_location(
            "_safety_conftest", Path(__file__).resolve().parents[1] / "tests" / "safety" / "conftest.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        tile_features = mod.tile_features
        got = benchmark.pedantic(lambda: tile_features(list(tiles)), rounds=3, warmup_rounds=1)
    ref = tile_statistics(tiles)
    # the colour statistics are the same numbers; the sharpness ones use other finite differences
    np.testing.assert_allclose(np.asarray(got)[:, :25], ref[:, :25], rtol=1e-3, atol=1e-3)
    benchmark.extra_info.update(impl=impl)
    record(benchmark, tiles=n)
