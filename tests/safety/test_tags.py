"""The tag rule: each tag reached for its stated reason, regions, slides, shadow mode, threshold files."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from cellvit_optimus.engine.errors import ConfigError, StateMismatchError
from cellvit_optimus.engine.io import atomic_write_bytes
from cellvit_optimus.safety import (
    MahalanobisOOD,
    SafetyConfig,
    ShadowMode,
    Tag,
    TagDecision,
    TagThresholds,
    TileSignals,
    tag_all,
    tag_regions,
    tag_slide,
    tag_tiles,
)

TH = TagThresholds(ood_review=5.0, ood_out=10.0)


def _one(**signals) -> TagDecision:
    base = {"ood_score": 1.0, "set_size": 1, "nucleus_set_size": 1.0, "np_entropy": 0.1,
            "nt_entropy": 0.1, "hv_consistency": 0.95, "quality_flags": [""]}
    base.update(signals)
    arrays = {k: (v if k == "quality_flags" else np.array([v], dtype=float)) for k, v in base.items()}
    return tag_tiles(TileSignals(**arrays), TH)[0]


@pytest.mark.parametrize(
    ("signals", "tag", "reason"),
    [
        ({}, Tag.RELIABLE, "all signals within thresholds"),
        ({"ood_score": 12.0}, Tag.OUT_OF_DOMAIN, "ood score 12 > out-of-domain threshold 10"),
        ({"ood_score": 12.0, "set_size": 3}, Tag.OUT_OF_DOMAIN, "out-of-domain threshold"),
        ({"ood_score": 7.0}, Tag.REVIEW, "ood score 7 > review threshold 5"),
        ({"set_size": 2}, Tag.REVIEW, "label set size 2 > 1"),
        ({"set_size": 0}, Tag.REVIEW, "empty label set"),
        ({"nucleus_set_size": 1.6}, Tag.REVIEW, "mean nucleus-type set size 1.60 > 1.25"),
        ({"np_entropy": 0.6}, Tag.REVIEW, "NP entropy 0.600 > 0.350"),
        ({"nt_entropy": 0.6}, Tag.REVIEW, "NT entropy 0.600 > 0.350"),
        ({"hv_consistency": 0.5}, Tag.REVIEW, "HV consistency 0.500 < 0.850"),
        ({"quality_flags": ["pen"]}, Tag.REVIEW, "quality flag: pen"),
        ({"ood_score": float("nan")}, Tag.REVIEW, "ood score is NaN"),
        ({"np_entropy": float("nan")}, Tag.REVIEW, "NP entropy is NaN"),
        ({"hv_consistency": float("nan")}, Tag.RELIABLE, "all signals"),  # no nuclei: not judged
    ],
)
def test_each_tag_for_its_reason(signals, tag, reason):
    d = _one(**signals)
    assert d.tag is tag
    assert reason in d.reason


def test_all_review_reasons_listed():
    d = _one(set_size=3, np_entropy=0.9, quality_flags=["blur"])
    assert d.tag is Tag.REVIEW
    assert d.reason.count(";") == 2 and "blur" in d.reason and "NP entropy" in d.reason


def test_missing_ood_score_is_review_unless_not_required():
    sig = TileSignals(set_size=np.array([1]))
    assert tag_tiles(sig, TH)[0] == TagDecision(Tag.REVIEW, "no ood score")
    assert tag_tiles(sig, TagThresholds(require_ood=False))[0].tag is Tag.RELIABLE


def test_ood_thresholds_must_come_from_state_or_file():
    sig = TileSignals(ood_score=np.array([1.0]))
    with pytest.raises(ConfigError, match="ood_review/ood_out are not set"):
        tag_tiles(sig, TagThresholds())
    rng = np.random.default_rng(0)
    ood = MahalanobisOOD().fit(rng.normal(size=(400, 4)))
    th = TagThresholds().with_ood(ood)
    assert th.ood_review == ood.thresholds.review and th.ood_out == ood.thresholds.out_of_domain
    far = ood.score(np.full((1, 4), 40.0))
    assert tag_tiles(TileSignals(ood_score=far), th)[0].tag is Tag.OUT_OF_DOMAIN


def test_regions_are_8_connected_groups_with_fraction_rule():
    stride = 224
    # region A: a 3x2 block; region B: two tiles three columns away from A; region C: a diagonal
    # pair (joined only through 8-connectivity)
    grid = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (6, 0), (7, 0), (4, 4), (5, 5)]
    coords = np.array(grid) * stride + np.array([1000, 2000])
    ood = np.array([1, 1, 1, 1, 1, 7, 12, 12, 12, 1], dtype=float)
    tiles = tag_tiles(TileSignals(ood_score=ood), TH)
    regions, dec = tag_regions(tiles, coords, stride, TH)
    assert regions.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 2, 2]
    assert dec[0].tag is Tag.REVIEW and dec[0].reason == "1 of 6 tiles uncertain: tissue unlike the reference"
    assert dec[1].tag is Tag.OUT_OF_DOMAIN
    assert dec[1].reason.startswith("2 of 2 tiles out of domain: tissue unlike the reference")
    assert dec[2].tag is Tag.OUT_OF_DOMAIN  # 1/2 >= region_ood_fraction 0.5
    slide = tag_slide(tiles, dec, TH)
    assert slide.tag is Tag.REVIEW  # 3/10 out of domain < 50%, but tiles need review
    clean = tag_tiles(TileSignals(ood_score=np.ones(10)), TH)
    _, cdec = tag_regions(clean, coords, stride, TH)
    assert tag_slide(clean, cdec, TH).tag is Tag.RELIABLE
    mostly_ood = tag_tiles(TileSignals(ood_score=np.full(10, 20.0)), TH)
    _, odec = tag_regions(mostly_ood, coords, stride, TH)
    assert tag_slide(mostly_ood, odec, TH).tag is Tag.OUT_OF_DOMAIN
    assert tag_slide([], [], TH) == TagDecision(Tag.REVIEW, "slide has no tiles")


def test_region_review_fraction_relaxes_worst_tag():
    th = TagThresholds(ood_review=5.0, ood_out=10.0, region_review_fraction=0.2)
    coords = np.array([(i, 0) for i in range(10)]) * 100
    tiles = tag_tiles(TileSignals(ood_score=np.r_[7.0, np.ones(9)]), th)
    _, dec = tag_regions(tiles, coords, 100, th)
    assert dec[0].tag is Tag.RELIABLE and dec[0].reason == "9 of 10 tiles reliable"


def test_shadow_mode_never_clears_a_slide(tmp_path):
    """property-style: many random signal combinations, the first N slides never come back reliable."""
    rng = np.random.default_rng(0)
    n_shadow = 30
    shadow = ShadowMode(tmp_path / "site.json", "site-A", n_slides=n_shadow, write=atomic_write_bytes)
    after = []
    for k in range(1, 61):
        n = int(rng.integers(1, 40))
        coords = rng.integers(0, 8, size=(n, 2)) * 256
        coords = np.unique(coords, axis=0)
        n = coords.shape[0]
        clean = rng.random() < 0.5  # half the slides are entirely clean, so "reliable" is often computed
        sig = TileSignals(
            ood_score=rng.uniform(0, 4, n) if clean else rng.uniform(0, 14, n),
            set_size=np.ones(n) if clean else rng.integers(0, 4, n),
            np_entropy=rng.uniform(0, 0.3, n) if clean else rng.uniform(0, 1, n),
            quality_flags=[""] * n if clean else list(rng.choice(["", "", "blur"], n)),
        )
        computed = tag_all(sig, coords, 256, TH)
        shown = tag_all(sig, coords, 256, TH, shadow=shadow, slide_id=f"slide-{k}")
        if k <= n_shadow:
            assert shown.slide.tag is not Tag.RELIABLE
            assert shown.slide.reason.startswith(f"new site: first {n_shadow} slides stay in review ({k} of {n_shadow}); ")
            if computed.slide.tag is Tag.RELIABLE:
                assert shown.slide.tag is Tag.REVIEW and "computed reliable" in shown.slide.reason
            else:
                assert shown.slide.tag is computed.slide.tag
        else:
            assert shown.slide == computed.slide
            after.append(shown.slide.tag)
    assert Tag.RELIABLE in after  # once the shadow period is over, slides can be cleared
    state = json.loads((tmp_path / "site.json").read_text())
    assert state["slides_seen"] == 60 and len(state["shadow_log"]) == n_shadow
    assert {"slide_id", "computed_tag", "computed_reason", "k"} <= set(state["shadow_log"][0])


def test_shadow_counter_persists_and_repeats_do_not_count(tmp_path):
    path = tmp_path / "site.json"
    ok = TagDecision(Tag.RELIABLE, "fine")
    s = ShadowMode(path, "site-B", n_slides=3, write=atomic_write_bytes)
    assert s.apply("a", ok).reason.startswith("new site: first 3 slides stay in review (1 of 3)")
    assert s.apply("a", ok).reason.startswith("new site: first 3 slides stay in review (1 of 3)")  # same slide again
    s2 = ShadowMode(path, "site-B", n_slides=3, write=atomic_write_bytes)  # a new process reading the same file
    assert s2.apply("b", ok).reason.startswith("new site: first 3 slides stay in review (2 of 3)")
    assert s2.apply("c", ok).tag is Tag.REVIEW
    assert not s2.active and s2.apply("d", ok) == ok
    with pytest.raises(StateMismatchError, match="site-B.*site-C"):
        ShadowMode(path, "site-C", write=atomic_write_bytes).apply("x", ok)


def test_shadow_counter_is_thread_safe(tmp_path):
    s = ShadowMode(tmp_path / "site.json", "site-T", n_slides=100, write=atomic_write_bytes)
    ok = TagDecision(Tag.RELIABLE, "fine")
    threads = [threading.Thread(target=lambda i=i: [s.apply(f"t{i}-{j}", ok) for j in range(5)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.slides_seen == 20


def test_thresholds_load_from_json(tmp_path):
    path = tmp_path / "thresholds.json"
    atomic_write_bytes(path, TagThresholds(ood_review=3.0, ood_out=6.0, np_entropy_max=0.5).to_bytes())
    th = TagThresholds.load(path)
    assert th.ood_review == 3.0 and th.np_entropy_max == 0.5 and th.max_set_size == 1
    # a site file with only some keys keeps the conservative defaults for the rest
    path.write_text(json.dumps({"kind": "tag_thresholds", "version": 1, "ood_review": 2.0, "ood_out": 4.0}))
    assert TagThresholds.load(path) == TagThresholds(ood_review=2.0, ood_out=4.0)
    path.write_text(json.dumps({"kind": "tag_thresholds", "version": 1, "ood_reveiw": 2.0}))
    with pytest.raises(ConfigError, match="unknown threshold field.*ood_reveiw"):
        TagThresholds.load(path)
    path.write_text(json.dumps({"kind": "tag_thresholds", "version": 1, "np_entropy_max": 1.5}))
    with pytest.raises(ConfigError, match="np_entropy_max=1.5"):
        TagThresholds.load(path)
    path.write_text(json.dumps({"kind": "split_conformal", "version": 1}))
    with pytest.raises(StateMismatchError, match="expected a 'tag_thresholds' state"):
        TagThresholds.load(path)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"ood_review": 5.0, "ood_out": 1.0}, "ood_review=5.0"), ({"max_set_size": 0}, "max_set_size=0"),
     ({"region_ood_fraction": 0.0}, "region_ood_fraction=0.0"),
     ({"slide_review_fraction": 1.0}, "slide_review_fraction=1.0"), ({"ood_out": float("inf")}, "ood_out=inf")],
)
def test_threshold_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        TagThresholds(**kw)


@pytest.mark.parametrize(("kw", "match"), [({"alpha": 0}, "alpha=0"), ({"shadow_slides": -1}, "shadow_slides=-1"),
                                           ({"conformal_score": "x"}, "conformal_score='x'")])
def test_safety_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        SafetyConfig(**kw)
    cfg = SafetyConfig()
    assert cfg.make_conformal().score == "raps" and cfg.make_ood().out_quantile == 0.995
    assert cfg.shadow_slides == 30


def test_public_api():
    import cellvit_optimus.safety as safety

    assert isinstance(safety.__all__, tuple)
    for name in safety.__all__:
        assert getattr(safety, name) is not None


def test_slide_reason_names_causes_in_plain_words_with_tile_counts():
    n = 10
    flags = ["blur"] * 3 + ["pen/artefact"] + [""] * 6
    nt = np.array([0.1] * 4 + [0.9] * 2 + [0.1] * 4)
    ood = np.ones(n)  # within the reference everywhere
    tiles = tag_tiles(TileSignals(ood_score=ood, nt_entropy=nt, quality_flags=flags), TH)
    slide = tag_slide(tiles, [], TH)
    assert slide.tag is Tag.REVIEW
    # the parts add up to the 6 they explain (the pen-marked tile was left out before: 3 + 2 of 6)
    assert slide.reason == ("6 of 10 tiles uncertain: blurred (3), nucleus types uncertain (2), "
                            "1 other cause (1)")
    assert len(tiles) == n


def test_quality_flags_follow_the_thresholds():
    from cellvit_optimus.safety.tags import quality_flags

    art = np.array([0.0, 0.25, 0.26, 0.9, 0.0], np.float32)
    blur = np.array([100.0, 15.0, 14.9, 3.0, np.inf], np.float32)
    assert quality_flags(art, blur, TagThresholds()) == ["", "", "pen/artefact,blur", "pen/artefact,blur", ""]
    # the flags move with the thresholds (a site's file may set them), not with literals in the engine
    loose = TagThresholds(artefact_flag_fraction=0.95, blur_flag_min=1.0)
    assert quality_flags(art, blur, loose) == ["", "", "", "", ""]
    strict = TagThresholds(artefact_flag_fraction=0.0, blur_flag_min=200.0)
    assert quality_flags(art, blur, strict) == ["blur", "pen/artefact,blur", "pen/artefact,blur",
                                                "pen/artefact,blur", ""]
    with pytest.raises(ValueError, match="artefact_fraction has 5 tiles, blur 4"):
        quality_flags(art, blur[:4], TagThresholds())
    with pytest.raises(ConfigError, match="artefact_flag_fraction=1.5"):
        TagThresholds(artefact_flag_fraction=1.5)
    with pytest.raises(ConfigError, match="blur_flag_min=-1"):
        TagThresholds(blur_flag_min=-1)


def test_quality_flag_thresholds_round_trip_through_a_file(tmp_path):
    path = tmp_path / "thresholds.json"
    atomic_write_bytes(path, TagThresholds(ood_review=3.0, ood_out=6.0, blur_flag_min=30.0).to_bytes())
    t = TagThresholds.load(path)
    assert t.blur_flag_min == 30.0 and t.artefact_flag_fraction == 0.25
