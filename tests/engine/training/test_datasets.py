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


def test_consep_whole_images_are_stitched_from_their_16_patches(consep, nuclei_dir):
    """whole 1000x1000 images (as HoVer-Net scores CoNSeP): every patch is a window of its image, pixels
    (JPEG patches agree within re-encoding noise where they overlap) and nuclei ids alike"""
    whole = load_consep(nuclei_dir, whole=True)
    assert [s.name for s in whole] == [f"consep/test_{i}" for i in range(1, 6)]
    assert all(s.group == s.name and s.image.shape == (1000, 1000, 3) for s in whole)
    origins = {0: (0, 0), 4: (256, 256), 9: (744, 0), 14: (512, 744), 15: (744, 744)}
    for p in consep:
        k = int(p.name.rsplit("_", 1)[1])
        if k not in origins:
            continue
        w = next(s for s in whole if s.group == p.group)
        r, c = origins[k]
        win = w.inst_map[r:r + 256, c:c + 256]
        # the same partition into nuclei: ids map one-to-one between the patch and its window
        pairs = np.unique(np.stack([p.inst_map.ravel(), win.ravel()]), axis=1)
        assert np.array_equal(pairs[0] > 0, pairs[1] > 0)
        assert len(set(pairs[0])) == len(set(pairs[1])) == pairs.shape[1]
        assert np.array_equal(w.type_map[r:r + 256, c:c + 256], p.type_map)
        assert np.abs(w.image[r:r + 256, c:c + 256].astype(int) - p.image).mean() < 3
    # a nucleus cut by a patch edge is one nucleus in the whole image: fewer than the patches' 3,383
    n_whole = sum(int(s.inst_map.max()) for s in whole)
    assert 2500 < n_whole < 3383


def test_consep_train_split(nuclei_dir):
    train = load_consep(nuclei_dir, split="train", whole=True)
    assert [s.name for s in train] == [f"consep/train_{i}" for i in range(1, 28)]
    counts = np.zeros(5, np.int64)
    for s in train:
        assert s.type_map is not None and set(np.unique(s.type_map)) <= {0, 1, 2, 3, 4}
        per_nucleus = np.zeros(int(s.inst_map.max()) + 1, np.int64)
        per_nucleus[s.inst_map.ravel()] = s.type_map.ravel()  # one type per nucleus
        counts += np.bincount(per_nucleus[1:], minlength=5)
    # README: about 17k typed nuclei over the 432 patches (overlaps counted twice there): 6.7k
    # spindle-shaped, 6.6k epithelial, 4.5k inflammatory, 0.4k other
    n = int(counts.sum())
    assert 12_000 < n < 17_500 and counts[0] == 0
    assert counts[1] < 0.05 * n and counts[1] < counts[2] < min(counts[3], counts[4])
    with pytest.raises(Exception, match="split='val'"):
        load_consep(nuclei_dir, split="val")


def test_the_default_model_splits_are_by_source_image_and_every_image_sits_in_one(nuclei_dir):
    """bench/train_default_nuclei.py: all five CoNSeP test images and three MoNuSeg images held out; the
    validation images come from the training images by the written fixed-seed rule; no image on two
    sides, both sources on every side"""
    script = bench_script("train_default_nuclei")
    HELD_OUT, VAL = script.HELD_OUT, script.VAL
    train, val, test = script.splits()
    assert {s.group for s in test} == set(HELD_OUT)
    assert {f"consep/test_{i}" for i in range(1, 6)} <= set(HELD_OUT)
    assert sum(g.startswith("monuseg/") for g in HELD_OUT) == 3
    assert list(VAL[:4]) == script.consep_val_draw()  # the rule reproduces the list
    assert {s.group for s in val} == set(VAL)
    groups = [{s.group for s in part} for part in (train, val, test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert len(groups[0]) + len(groups[1]) + len(groups[2]) == 27 + 5 + 13
    for part in (train, val, test):
        assert {s.source for s in part} == {"consep", "monuseg"}
    assert all(g.startswith("consep/train_") for g in VAL if g.startswith("consep/"))
