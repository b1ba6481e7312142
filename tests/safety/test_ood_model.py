"""OOD detection with the bundled model on real tiles (issue #7, must-show 3) and the shipped OOD state.

Tiles come from ``ood_tiles`` (real in-domain H&E at 0.5 um/px and real shifts, see its docstring);
features are what the engine scores: the bundled backbone's tile embedding next to the product's
tile statistics (recipe ``embedding+tile_stats/1``). The full table, with the embedding alone and a
new-source protocol, is ``bench/eval_ood.py`` -> ``bench/results/ood_auroc.json``; the bounds below
sit under the figures measured there (shifted sets are smaller here, 60 tiles, to keep the test short).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bench_scripts import bench_script
from cellvit_optimus.engine.errors import StateMismatchError
from cellvit_optimus.engine.io import atomic_write_bytes
from cellvit_optimus.safety import MahalanobisOOD, SafetyConfig
from cellvit_optimus.safety.ood_features import EMBEDDING, EMBEDDING_TILE_STATS
from ood_tiles import (
    MPP,
    derived_shifts,
    features,
    fixed_shifts,
    in_domain,
    split_reference,
)

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / "engine" / "data" / "default_ood.npz"
N_SHIFTED = 60


def _auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(s_in.size), np.ones(s_out.size)], np.r_[s_in, s_out]))


@pytest.fixture(scope="module")
def model():
    torch = pytest.importorskip("torch")
    from cellvit_optimus.engine.pipeline.nuclei import NucleiModel

    torch.manual_seed(0)
    return NucleiModel()


@pytest.fixture(scope="module")
def data(shared_data, model):
    ind = in_domain(shared_data)
    ref = split_reference(ind)
    f_in = features(model.runner, ind.tiles)
    fixed = {k: features(model.runner, v) for k, v in fixed_shifts(shared_data, N_SHIFTED).items()}
    held = {k: features(model.runner, v)
            for k, v in derived_shifts(shared_data, ind.tiles[~ref], N_SHIFTED).items()}
    cmu = ind.sources == "cmu1"
    new_site = {k: features(model.runner, v)
                for k, v in derived_shifts(shared_data, ind.tiles[cmu], N_SHIFTED).items()}
    return ind, ref, f_in, fixed, held, new_site


# measured with the end-to-end trained backbone (bench/results/ood_auroc.json, 150 tiles per shift):
# >= 0.996 for every shift type but mild blur (sigma 1 px: 0.970); with the issue-27 model (v4) mild blur
# is 0.945 on this test's 60 tiles
HELD_OUT_MIN = {"ihc": 0.98, "pen_dicom": 0.98, "non_tissue": 0.98, "prostate_dicom": 0.98,
                "blur_s1": 0.93, "blur_s2": 0.98, "blur_s4": 0.98, "pen_ink_transfer": 0.97}


@pytest.mark.slow
def test_bundled_model_auroc_per_shift_type(data, report):
    ind, ref, f_in, fixed, held, _ = data
    x = f_in[EMBEDDING_TILE_STATS]
    ood = MahalanobisOOD(features=EMBEDDING_TILE_STATS).fit(x[ref], groups=ind.groups[ref])
    s_in = ood.score(x[~ref])
    got = {k: _auroc(s_in, ood.score(v[EMBEDDING_TILE_STATS])) for k, v in {**fixed, **held}.items()}
    report("ood auroc bundled model (held-out groups)", {k: round(v, 4) for k, v in got.items()})
    for k, v in got.items():
        assert v >= HELD_OUT_MIN[k], (k, v)
    # the backbone's embedding alone separates another stain (0.956: trained with stain jitter it is less
    # stain-sensitive than the former random-init one, 0.998) but hardly blur: why the engine's OOD feature
    # carries the tile statistics (stated in safety/ood_features.py)
    emb = MahalanobisOOD().fit(f_in[EMBEDDING][ref], groups=ind.groups[ref])
    e_in = emb.score(f_in[EMBEDDING][~ref])
    e_auc = {k: _auroc(e_in, emb.score(v[EMBEDDING])) for k, v in {**fixed, **held}.items()}
    report("ood auroc embedding alone (held-out groups)", {k: round(v, 4) for k, v in e_auc.items()})
    assert e_auc["ihc"] >= 0.93
    assert e_auc["blur_s1"] < 0.65 and e_auc["blur_s2"] < 0.65


# a new site: CMU-1 (Aperio, 20x) left out of the reference; its own tiles blurred / inked as shifts.
# measured (trained backbone): ihc 0.928, pen 0.995, non-tissue 0.984, prostate 0.909, blur sigma 4 0.934,
# ink 0.921, blur sigma 2 0.747 and blur sigma 1 0.515 (the random-init backbone gave 0.984, 0.998, 0.995,
# 0.998, 0.993, 0.966, 0.861, 0.462: lower now at a new site; mild blur is short of the 0.9 goal either
# way: a 20x JPEG scan is already softer than the 40x reference images)
NEW_SITE_MIN = {"ihc": 0.90, "pen_dicom": 0.97, "non_tissue": 0.97, "prostate_dicom": 0.88,
                "blur_s4": 0.90, "pen_ink_transfer": 0.90, "blur_s2": 0.72}


@pytest.mark.slow
def test_new_site_auroc_and_false_alarms(data, report):
    ind, _, f_in, fixed, _, new_site = data
    x = f_in[EMBEDDING_TILE_STATS]
    cmu = ind.sources == "cmu1"
    ood = MahalanobisOOD(features=EMBEDDING_TILE_STATS).fit(x[~cmu], groups=ind.groups[~cmu])
    s_in = ood.score(x[cmu])
    got = {k: _auroc(s_in, ood.score(v[EMBEDDING_TILE_STATS])) for k, v in {**fixed, **new_site}.items()}
    above = float((s_in > ood.thresholds.out_of_domain).mean())
    report("ood auroc new site cmu1", {**{k: round(v, 4) for k, v in got.items()}, "in_domain_above_ood": above})
    for k, lo in NEW_SITE_MIN.items():
        assert got[k] >= lo, (k, got[k])
    # honest bound on false alarms at a site the reference never saw (measured 0.24): refit per site
    assert above < 0.4


@pytest.mark.slow
def test_shipped_state_is_bound_small_and_reproducible(data, model):
    ind, _, f_in, fixed, _, _ = data
    assert STATE.is_file() and STATE.stat().st_size < 1_000_000
    bid, wh = model.runner.preset.name, model.runner.weights_id
    ood = MahalanobisOOD.load(STATE, backbone_id=bid, weights_hash=wh)
    assert bid == "tiny" and wh == model.metadata["backbone_hash"] and wh.startswith("sha256:")
    assert ood.features == EMBEDDING_TILE_STATS and ood.tile_mpp == MPP
    assert ood.provenance["script"] == "bench/fit_default_ood.py"
    with pytest.raises(StateMismatchError, match="backbone_id='tiny'.*'small'"):
        MahalanobisOOD.load(STATE, backbone_id="small", weights_hash=wh)
    with pytest.raises(StateMismatchError, match=f"weights_hash='{wh}'.*seed=1"):
        MahalanobisOOD.load(STATE, backbone_id=bid, weights_hash="random:tiny:seed=1")
    # the fitting script's own fit on the same tiles reproduces it (else: the tiles or the backbone
    # changed, and the state must be refitted with `python bench/fit_default_ood.py`)
    fit = bench_script("fit_default_ood")
    keep = ~np.isin(ind.groups, fit.HELD_OUT)  # the nuclei model's held-out images are not reference
    assert 0 < (~keep).sum() <= 3 * 16  # three images' tiles
    refit = fit.reference_fit(f_in[EMBEDDING_TILE_STATS][keep], ind.groups[keep])
    np.testing.assert_allclose([refit.thresholds.review, refit.thresholds.out_of_domain],
                               [ood.thresholds.review, ood.thresholds.out_of_domain], rtol=1e-3)
    np.testing.assert_allclose(refit.score(f_in[EMBEDDING_TILE_STATS][:50]),
                               ood.score(f_in[EMBEDDING_TILE_STATS][:50]), rtol=1e-3)
    # the shipped thresholds send real shifts out of domain and keep the reference tiles in
    # (IHC: 0.79 of its tiles with the trained backbone, 1.0 with the former random-init one)
    for k, lo in (("ihc", 0.75), ("pen_dicom", 0.9), ("non_tissue", 0.9), ("prostate_dicom", 0.9)):
        frac = float((ood.score(fixed[k][EMBEDDING_TILE_STATS]) > ood.thresholds.out_of_domain).mean())
        assert frac >= lo, (k, frac)
    assert float((ood.score(f_in[EMBEDDING_TILE_STATS]) > ood.thresholds.out_of_domain).mean()) <= 0.01


def _mosaic(path: Path, slides_dir: Path) -> Path:
    """a real two-part slide at 0.5 um/px: CMU-1 H&E on the left, scikit-image's IHC on the right"""
    tifffile = pytest.importorskip("tifffile")
    skdata = pytest.importorskip("skimage.data")
    from cellvit_optimus.engine.wsi.slide import open_slide

    with open_slide(slides_dir / "cmu-1-small-region.svs") as s:
        he = s.read_region((700, 1300), 0, (544, 544))
    ihc = np.ascontiguousarray(skdata.immunohistochemistry()[..., :3])
    img = np.full((544, 544 + 384 + 512, 3), (240, 240, 238), np.uint8)  # glass between the two
    img[:, :544] = he
    img[16:528, 544 + 384:] = ihc
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return path


def test_engine_tags_the_ihc_region_out_of_domain(tmp_path, slides_dir):
    from cellvit_optimus.engine.triage.engine import Engine, TriageConfig

    engine = Engine(TriageConfig(safety=SafetyConfig(shadow_slides=0)))
    assert engine.ood is not None and engine.ood.features == EMBEDDING_TILE_STATS  # the bundled state
    batch = engine.run([_mosaic(tmp_path / "he-ihc.tif", slides_dir)], tmp_path / "out")
    [r] = batch.results
    regions = json.loads(Path(r.outputs["regions"]).read_text())["features"]
    assert len(regions) == 2
    left, right = sorted(regions, key=lambda f: min(x for x, _ in f["geometry"]["coordinates"][0]))
    assert right["properties"]["classification"]["name"] == "out_of_domain"
    assert left["properties"]["classification"]["name"] != "out_of_domain"
    assert "ood score" not in left["properties"]["metadata"]["reason"]
    # most of the IHC region's tiles are out of domain themselves (measured 9 of 10 with the trained backbone)
    ihc_share = right["properties"]["measurements"]["tiles"] / r.tiles
    assert 0.8 * ihc_share <= r.tag_fractions["out_of_domain"] <= ihc_share + 1e-3
    # the bundled nucleus-type calibration is loaded too: every nucleus carries its conformal set size
    assert engine.conformal is not None
    cells = json.loads(Path(r.outputs["cells"]).read_text())["features"]
    sizes = [c["properties"]["measurements"]["type_set_size"] for c in cells]
    assert cells and all(1 <= k <= 4 for k in sizes)


def test_old_states_without_a_recipe_load_as_embedding(tmp_path):
    x = np.random.default_rng(0).normal(size=(200, 5))
    ood = MahalanobisOOD().fit(x)
    p = tmp_path / "old.npz"
    atomic_write_bytes(p, ood.to_bytes(backbone_id="b", weights_hash="h"))
    with np.load(p) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    for k in ("features", "tile_mpp", "provenance"):
        meta.pop(k)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(p, **arrays)
    back = MahalanobisOOD.load(p)
    assert back.features == EMBEDDING and back.tile_mpp is None
    meta["features"] = "embedding+tokens/9"
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(p, **arrays)
    with pytest.raises(StateMismatchError, match="embedding\\+tokens/9"):
        MahalanobisOOD.load(p)


def test_tile_statistics_and_recipes_contract(slides_dir):
    from cellvit_optimus.engine.errors import ConfigError
    from cellvit_optimus.engine.wsi.slide import open_slide
    from cellvit_optimus.safety import SafetyConfig, ood_features, tile_statistics
    from scipy import ndimage

    with open_slide(slides_dir / "cmu-1-small-region.svs") as s:
        tile = s.read_region((900, 1500), 0, (224, 224))
    soft = np.stack([ndimage.gaussian_filter(tile[..., c], 2) for c in range(3)], -1)
    glass = np.full((224, 224, 3), 245, np.uint8)
    st = tile_statistics(np.stack([tile, soft, glass]))
    assert st.shape == (3, 29) and st.dtype == np.float32 and np.isfinite(st).all()
    assert (st[1, 25:] < st[0, 25:]).all()  # blur lowers every sharpness statistic
    assert st[2, 21] == 0.0 and np.allclose(st[2, 22:25], 1 / 3)  # glass: nothing stained
    assert tile_statistics(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 29)
    with pytest.raises(ConfigError, match=r"uint8 \(N, H, W, 3\), got float32 \(224, 224, 3\)"):
        tile_statistics(tile.astype(np.float32))
    emb = np.zeros((3, 192), np.float32)
    assert ood_features(EMBEDDING_TILE_STATS, emb, st).shape == (3, 221)
    assert ood_features(EMBEDDING, emb).shape == (3, 192)
    with pytest.raises(ValueError, match="needs the tile statistics"):
        ood_features(EMBEDDING_TILE_STATS, emb)
    with pytest.raises(ValueError, match=r"\(2, 29\), expected \(3, 29\)"):
        ood_features(EMBEDDING_TILE_STATS, emb, st[:2])
    with pytest.raises(ConfigError, match="recipe 'tokens' is unknown"):
        ood_features("tokens", emb)
    with pytest.raises(ConfigError, match="features='tokens'"):
        MahalanobisOOD(features="tokens")
    with pytest.raises(ConfigError, match="ood_features='tokens'"):
        SafetyConfig(ood_features="tokens")
    assert SafetyConfig().make_ood().features == EMBEDDING_TILE_STATS
