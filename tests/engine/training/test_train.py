"""Nuclei-head and MIL training on the real annotated sets (CPU, a few samples, seconds per test)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cellvit_optimus.engine.errors import ConfigError  # noqa: E402
from cellvit_optimus.engine.training.datasets import (  # noqa: E402
    NucleiSample,
    load_consep,
    load_monuseg,
    read_dataset,
    read_geojson_folder,
    read_instance_folder,
    read_pannuke,
    relabel,
    resample_sample,
    split_by_group,
)
from cellvit_optimus.engine.training.tiles import TokenCache, make_tiles  # noqa: E402
from cellvit_optimus.engine.training.train import NucleiTrainConfig, train_mil, train_nuclei  # noqa: E402


@pytest.fixture(scope="module")
def consep(nuclei_dir: Path) -> list[NucleiSample]:
    return load_consep(nuclei_dir)


@pytest.fixture(scope="module")
def monuseg_crop(nuclei_dir: Path) -> NucleiSample:
    """A 256 px crop of a real MoNuSeg image (no types: its NT loss must be masked)."""
    s = load_monuseg(nuclei_dir)[0]
    return NucleiSample("monuseg/crop", "monuseg", s.image[:256, :256].copy(), relabel(s.inst_map[:256, :256]),
                        None, s.mpp, s.group)


@pytest.fixture(scope="module")
def runner():
    from cellvit_optimus.engine.pipeline.runner import BackboneRunner

    torch.set_num_threads(2)
    return BackboneRunner("tiny", batch_size=8)


FAST = dict(epochs=2, batch_size=4, crop=56, lr=2e-3)


def test_second_epoch_and_second_run_make_no_backbone_call(consep, monuseg_crop, runner, tmp_path):
    samples = [consep[0], consep[20], monuseg_crop]
    cfg = NucleiTrainConfig(cache_dir=str(tmp_path / "cache"), **FAST)
    calls0 = runner.calls
    res = train_nuclei(samples, tmp_path / "head.safetensors", cfg, runner=runner)
    # the backbone ran once per tile batch while the cache was filled, never during an epoch
    assert res.backbone_calls_cache == runner.calls - calls0 > 0
    assert [h["backbone_calls"] for h in res.history] == [0, 0]
    assert all(np.isfinite(h["loss"]) for h in res.history)
    assert "nt_ce" in res.history[0]  # typed CoNSeP samples train NT; the MoNuSeg crop is masked
    assert res.cache_path.is_file()
    # a second run on the same data and backbone reads the cache: no backbone call at all
    calls1 = runner.calls
    res2 = train_nuclei(samples, None, cfg, runner=runner)
    assert runner.calls == calls1 and res2.backbone_calls_cache == 0
    assert res2.cache_path == res.cache_path

    from cellvit_optimus.heads.checkpoint import read_metadata
    from cellvit_optimus.engine.pipeline.nuclei import NucleiModel

    meta = read_metadata(res.checkpoint)
    assert meta["backbone_id"] == "tiny" and meta["backbone_hash"] == "random:tiny:seed=0"
    assert json.loads(meta["class_profile"])["name"] == "consep"
    extra = json.loads(meta["extra"])
    assert extra["epochs_run"] == 2 and extra["config"]["nuclei_mpp"] == 0.5
    model = NucleiModel(res.checkpoint)
    maps = model.predict(consep[0].image[:224, :224][None])
    assert maps.np.shape == (1, 224, 224) and maps.hv.shape == (1, 2, 224, 224) and maps.nt.shape == (1, 5, 224, 224)
    np.testing.assert_allclose(maps.nt.sum(1), 1.0, atol=1e-4)


def test_cache_key_changes_with_data_and_resolution(consep, runner, tmp_path):
    a = make_tiles(consep[:1], 0.25)
    b = make_tiles(consep[1:2], 0.25)
    c = make_tiles(consep[:1], 0.5)
    keys = {TokenCache(tmp_path, runner, t, m).key for t, m in ((a, 0.25), (b, 0.25), (c, 0.5))}
    assert len(keys) == 3


def test_curriculum_training_runs(consep, runner, tmp_path):
    cfg = NucleiTrainConfig(nuclei_mpp=0.25, cache_dir=str(tmp_path), curriculum=True, curriculum_warmup=2, epochs=1,
                            batch_size=4, crop=56)
    res = train_nuclei(consep[:2], None, cfg, runner=runner)
    assert res.history[0]["tiles"] < res.n_train_tiles  # only the easiest fraction in the first epoch


def test_make_tiles_resamples_and_pads(consep, nuclei_dir):
    s = consep[0]  # 256 px at 0.25
    half = resample_sample(s, 0.5)
    assert half.image.shape == (128, 128, 3) and half.inst_map.shape == (128, 128)
    t = make_tiles([s], 0.5)
    assert len(t) == 1 and t.images.shape == (1, 224, 224, 3)
    assert (t.images[0, 128:] == 255).all() and (t.inst[0, 128:] == 0).all()
    t25 = make_tiles([s], 0.25, stride=168)
    assert len(t25) == 4 and t25.has_types.all()
    m = load_monuseg(nuclei_dir)[0]  # 0.2527 MPP: within tolerance of 0.25, used as is
    assert resample_sample(m, 0.25) is m


def test_split_by_group_never_leaks(consep):
    train, test = split_by_group(consep, ["consep/test_2"])
    assert {s.group for s in test} == {"consep/test_2"} and len(test) == 16
    assert not {s.group for s in train} & {s.group for s in test}
    with pytest.raises(ConfigError, match="not found"):
        split_by_group(consep, ["consep/test_99"])


def _write_pannuke(folder: Path, samples: list[NucleiSample]) -> None:
    folder.mkdir(parents=True)
    imgs = np.stack([s.image for s in samples]).astype(np.float64)  # PanNuke ships float images
    masks = np.zeros((len(samples), 256, 256, 6), np.float64)
    for i, s in enumerate(samples):
        for c in range(1, 6):
            sel = s.type_map == c
            masks[i, ..., c - 1][sel] = s.inst_map[sel]
        masks[i, ..., 5] = s.inst_map == 0
    np.save(folder / "images.npy", imgs)
    np.save(folder / "masks.npy", masks)
    np.save(folder / "types.npy", np.array(["Colon"] * len(samples)))


def test_readers_round_trip_real_annotations(consep, tmp_path):
    from cellvit_optimus.engine.geojson import cells_to_geojson
    from cellvit_optimus.heads.profiles import CONSEP
    from cellvit_optimus.kernels import instance_table, instance_types

    s = consep[3]
    n = int(s.inst_map.max())
    # PanNuke layout
    _write_pannuke(tmp_path / "pannuke" / "fold1", [s])
    (p,) = read_pannuke(tmp_path / "pannuke")
    assert p.inst_map.max() == n and p.image.dtype == np.uint8
    np.testing.assert_array_equal(p.inst_map > 0, s.inst_map > 0)
    np.testing.assert_array_equal(p.type_map, s.type_map)
    # instance-map folder
    d = tmp_path / "inst_folder"
    for sub in ("images", "inst", "types"):
        (d / sub).mkdir(parents=True)
    from PIL import Image

    Image.fromarray(s.image).save(d / "images" / "a_001.png")
    Image.fromarray(s.image).save(d / "images" / "a_002.png")
    for k in ("a_001", "a_002"):
        np.save(d / "inst" / f"{k}.npy", s.inst_map * 7)  # non-contiguous ids get relabelled
        np.save(d / "types" / f"{k}.npy", s.type_map)
    got = read_instance_folder(d)
    assert [g.group for g in got] == ["inst_folder/a"] * 2  # <image>_<patch> names group by image
    np.testing.assert_array_equal(got[0].inst_map, s.inst_map)
    assert read_dataset(str(d))[0].name == got[0].name
    # GeoJSON polygons (written with our own writer, QuPath layout) rasterise back to the same nuclei
    g = tmp_path / "geo"
    (g / "images").mkdir(parents=True)
    Image.fromarray(s.image).save(g / "images" / "x.png")
    tab = instance_table(s.inst_map)
    tab = type(tab)(**{**tab.__dict__, "types": instance_types(s.inst_map, s.type_map)[1:]})
    (g / "images" / "x.geojson").write_text(json.dumps(cells_to_geojson(tab, CONSEP)))
    (r,) = read_geojson_folder(g, CONSEP)
    assert abs(int(r.inst_map.max()) - n) <= 1
    agree = (r.inst_map > 0) == (s.inst_map > 0)
    assert agree.mean() > 0.97
    fg = (r.type_map > 0) & (s.type_map > 0)
    assert (r.type_map[fg] == s.type_map[fg]).mean() > 0.97
    # PUMA's polygon JSON
    puma = {"type": "Multiple polygons", "version": {"major": 1, "minor": 0}, "polygons": [
        {"name": "nuclei_tumor", "path_points": [[10, 10, 0.5], [30, 10, 0.5], [30, 30, 0.5], [10, 30, 0.5]]}]}
    (g / "images" / "x.geojson").unlink()
    (g / "images" / "x.json").write_text(json.dumps(puma))
    from cellvit_optimus.heads.profiles import PUMA_NUCLEI

    (r,) = read_geojson_folder(g, PUMA_NUCLEI)
    assert r.inst_map.max() == 1 and set(np.unique(r.type_map)) == {0, PUMA_NUCLEI.index("tumour")}


def _write_bags(folder: Path, n: int = 8, dim: int = 16) -> Path:
    from cellvit_optimus.engine.pipeline.features import FeatureWriter

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = i % 2
        feats = rng.normal(size=(20, dim)).astype(np.float32)
        feats[:5, 0] += 4.0 * label  # a few positive tiles carry the signal
        w = FeatureWriter(folder / f"slide{i}.h5", 20, dim,
                          {"backbone": "tiny", "weights_hash": "random:tiny:seed=0"},
                          {"coords": np.zeros((20, 2), np.int64)})
        w.write(np.arange(20), feats)
        w.commit()
        rows.append({"slide": f"slide{i}.svs", "label": "tumour" if label else "normal"})
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as fh:
        wr = csv.DictWriter(fh, ["slide", "label"])
        wr.writeheader()
        wr.writerows(rows)
    return labels


def test_train_mil_on_feature_files(tmp_path):
    from cellvit_optimus.heads.checkpoint import load_mil

    labels = _write_bags(tmp_path)
    res = train_mil(tmp_path, labels, tmp_path / "mil.safetensors", epochs=30, lr=1e-3)
    assert res.classes == ("normal", "tumour") and res.n_bags == 8 and res.train_accuracy >= 0.75
    loaded = load_mil(res.checkpoint, backbone_id="tiny", backbone_hash="random:tiny:seed=0", in_dim=16)
    assert loaded.output_names == ("tumour",)


def test_cli_train_nuclei_and_mil(consep, tmp_path):
    from click.testing import CliRunner

    from cellvit_optimus.engine.training.cli import train

    d = tmp_path / "data"
    for sub in ("images", "inst", "types"):
        (d / sub).mkdir(parents=True)
    from PIL import Image

    for s in consep[:2]:
        stem = s.name.split("/")[1]
        Image.fromarray(s.image).save(d / "images" / f"{stem}.png")
        np.save(d / "inst" / f"{stem}.npy", s.inst_map)
        np.save(d / "types" / f"{stem}.npy", s.type_map)
    out = tmp_path / "n.safetensors"
    r = CliRunner().invoke(train, ["nuclei", "--dataset", f"folder:{d}", "--profile", "consep", "--epochs", "1",
                                   "--batch-size", "4", "--crop", "56", "--cache-dir", str(tmp_path / "c"),
                                   "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and json.loads(r.stdout)["train_tiles"] == 2  # one padded tile per patch at 0.5 MPP
    r = CliRunner().invoke(train, ["nuclei", "--dataset", "consep", "--held-out", "nope", "--out", str(out)])
    assert r.exit_code == 2 and "not found" in r.output
    labels = _write_bags(tmp_path / "bags")
    r = CliRunner().invoke(train, ["mil", str(tmp_path / "bags"), str(labels), "--epochs", "5",
                                   "--out", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["classes"] == ["normal", "tumour"]


def test_config_validation():
    with pytest.raises(ConfigError, match="crop=100"):
        NucleiTrainConfig(crop=100)
    with pytest.raises(ConfigError, match="nuclei_mpp"):
        NucleiTrainConfig(nuclei_mpp=0)
