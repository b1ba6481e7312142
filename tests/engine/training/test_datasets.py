"""Real nuclei loaders: shapes, dtypes, contiguous ids, CoNSeP types against seg_mask, groups."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench_scripts import bench_script
from cellvit_optimus.engine.training.datasets import CONSEP_CLASSES, load_consep, load_monuseg


@pytest.fixture(scope="module")
def consep(nuclei_dir):
    return load_consep(nuclei_dir)


def test_consep(consep, nuclei_dir):
    assert len(consep) == 80
    assert sum(int(s.inst_map.max()) for s in consep) == 3383  # README: 3,383 nuclei
    assert {s.group for s in consep} == {f"consep/test_{i}" for i in range(1, 6)}
    assert CONSEP_CLASSES[1:] == ("other", "inflammatory", "epithelial", "spindle-shaped")
    for s in consep[::7]:
        assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
        assert s.inst_map.dtype == np.int32 and s.type_map is not None and s.type_map.dtype == np.int32
        ids = np.unique(s.inst_map)
        assert ids.tolist() == list(range(int(ids.max()) + 1))
        seg = np.asarray(Image.open(nuclei_dir / "consep-patches" / "seg_mask" / f"{s.name.split('/')[1]}.png"))
        assert np.array_equal(s.type_map, seg)  # merged scheme: types agree with the semantic mask
        assert s.mpp == pytest.approx(0.25) and s.source == "consep"


def test_monuseg(nuclei_dir):
    ms = load_monuseg(nuclei_dir)
    assert len(ms) == 13
    # 4,951 regions; 2 are entirely covered by later overlapping polygons
    assert sum(int(s.inst_map.max()) for s in ms) == 4949
    s = ms[0]
    assert s.image.shape == (1000, 1000, 3) and s.inst_map.shape == (1000, 1000)
    assert s.type_map is None and s.mpp == pytest.approx(0.2527) and s.group == s.name


def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_consep(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="monuseg-train"):
        load_monuseg(tmp_path)


def test_the_default_model_splits_are_by_source_image_and_every_image_sits_in_one(consep, nuclei_dir):
    """bench/train_default_nuclei.py's held-out and validation sets: real groups of the data, no image
    on two sides, and the larger validation set v2 holds v1 plus more images of both sources"""
    script = bench_script("train_default_nuclei")
    HELD_OUT, VAL_SETS = script.HELD_OUT, script.VAL_SETS
    groups = {s.group for s in consep} | {s.group for s in load_monuseg(nuclei_dir)}
    assert len(groups) == 18
    assert set(HELD_OUT) <= groups
    for name, val in VAL_SETS.items():
        assert set(val) <= groups and not set(val) & set(HELD_OUT), name
        train = groups - set(val) - set(HELD_OUT)
        assert {g.split("/")[0] for g in train} == {g.split("/")[0] for g in val} == {"consep", "monuseg"}
    assert set(VAL_SETS["v1"]) < set(VAL_SETS["v2"])
    assert len(VAL_SETS["v2"]) == 5 and sum(g.startswith("consep/") for g in VAL_SETS["v2"]) == 2
