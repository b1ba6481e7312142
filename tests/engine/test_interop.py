"""Our feature files read by readers written to Trident's and CLAM's published layouts.

The readers below are written from the published file layouts (facts only: which dataset, which
attribute names, which dtypes), not copied from either project:

- Trident (mahmoodlab/TRIDENT, patch-feature ``.h5``): ``features`` (N, D) float, ``coords`` (N, 2)
  int64 level-0 top-left corners, and on the ``coords`` dataset the attributes its slide encoders,
  heatmaps and coordinate reuse read: ``patch_size``, ``patch_size_level0`` (cast to int),
  ``level0_magnification``, ``target_magnification`` (pixel size = 10 / magnification), ``overlap``,
  ``name``, ``level0_width``, ``level0_height``.
- CLAM (mahmoodlab/CLAM): the MIL dataset loads ``DATA_DIR/pt_files/<slide_id>.pt`` (a features
  tensor) or, in h5 mode, ``features`` and ``coords`` from ``DATA_DIR/h5_files/<slide_id>.h5``; its
  coordinate readers take ``patch_level``, ``patch_size`` and ``name`` from the ``coords`` dataset.
"""

from __future__ import annotations

from numbers import Integral, Real
from pathlib import Path

import h5py
import numpy as np
import pytest

from cellvit_optimus.engine.pipeline.extract import ExtractConfig, extract_features, feature_path
from cellvit_optimus.engine.pipeline.features import (coords_attributes, read_features, write_clam_layout,
                                                     write_trident_layout)
from cellvit_optimus.engine.pipeline.scheduler import SchedulerConfig, SlideDone
from cellvit_optimus.engine.wsi.slide import open_slide
from cellvit_optimus.engine.wsi.tissue import TilingConfig, tile_grid

COARSE = ExtractConfig(tiling=TilingConfig(target_mpp=2.0), scheduler=SchedulerConfig(batch_tiles=16))
TRIDENT_COORDS_ATTRS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
                        "overlap", "name", "level0_width", "level0_height")


def trident_read(path: Path) -> dict:
    """what Trident's slide encoders / heatmap / coords reuse take from a patch-feature file"""
    with h5py.File(path, "r") as f:
        features = f["features"][:]
        coords = f["coords"][:]
        attrs = dict(f["coords"].attrs)
    missing = [k for k in TRIDENT_COORDS_ATTRS if k not in attrs]
    assert not missing, f"{path}: coords lacks {missing}"
    assert features.ndim == 2 and np.issubdtype(features.dtype, np.floating)
    assert coords.dtype == np.int64 and coords.shape == (features.shape[0], 2)
    for k in ("patch_size", "patch_size_level0", "overlap", "level0_width", "level0_height"):
        assert isinstance(attrs[k], Integral), f"{k}: {type(attrs[k]).__name__}"
    for k in ("level0_magnification", "target_magnification"):
        assert isinstance(attrs[k], Real) and attrs[k] > 0, f"{k}: {attrs[k]!r}"
    assert isinstance(attrs["name"], str)
    # a patcher rebuilt from these attributes (pixel size = 10 / magnification) covers the same
    # level-0 footprint as the one recorded
    src_px, dst_px = 10 / attrs["level0_magnification"], 10 / attrs["target_magnification"]
    rebuilt = attrs["patch_size"] * dst_px / src_px
    return {"features": features, "coords": coords, "attrs": attrs, "rebuilt_level0": rebuilt,
            "patch_size_level0": int(attrs["patch_size_level0"])}


def clam_read(data_dir: Path, slide_id: str) -> dict:
    """CLAM's MIL dataset in both modes, and its coordinate readers' attributes"""
    import torch

    pt = torch.load(data_dir / "pt_files" / f"{slide_id}.pt")
    with h5py.File(data_dir / "h5_files" / f"{slide_id}.h5", "r") as f:
        features = f["features"][:]
        coords = f["coords"][:]
        dset = f["coords"]
        patch_level, patch_size, name = (dset.attrs["patch_level"], dset.attrs["patch_size"],
                                         dset.attrs["name"])
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32
    return {"pt": pt.numpy(), "features": features, "coords": coords, "patch_level": int(patch_level),
            "patch_size": int(patch_size), "name": name}


@pytest.fixture(scope="module")
def runner():
    from cellvit_optimus.engine.pipeline.runner import BackboneRunner

    return BackboneRunner("tiny", device="cpu")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, slides_dir, runner):
    out = tmp_path_factory.mktemp("interop")
    names = ["cmu-1-small-region.svs", "prostate-small.dcm"]
    results = extract_features([slides_dir / n for n in names], out, runner, COARSE)
    assert all(isinstance(r, SlideDone) for r in results)
    return out, names


def _grid(slides_dir: Path, name: str, tiling: TilingConfig):
    with open_slide(slides_dir / name) as s:
        return tile_grid(s, tiling), s.dimensions, s.mpp


@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "prostate-small.dcm"])
def test_trident_reader_reads_our_files(extracted, slides_dir, name):
    out, _ = extracted
    got = trident_read(feature_path(out, name))
    grid, dims, _ = _grid(slides_dir, name, COARSE.tiling)
    a = got["attrs"]
    np.testing.assert_array_equal(got["coords"], grid.coords)
    assert got["features"].shape == (len(grid), 192)
    assert a["name"] == Path(name).stem
    assert (a["level0_width"], a["level0_height"]) == dims
    assert a["patch_size"] == 224 and a["target_magnification"] == 5  # 2.0 um/px
    assert got["patch_size_level0"] == grid.level0_size[0]
    assert tuple(a["patch_size_level0_xy"]) == grid.level0_size
    assert abs(got["rebuilt_level0"] - got["patch_size_level0"]) < 1.0
    assert a["overlap"] == 0
    # the root attributes stay for our own readers (MIL training, cache)
    f = read_features(feature_path(out, name))
    assert f.attrs["patch_size_level0"] == grid.level0_size[0] and f.attrs["cache_key"]
    assert f.coords_attrs["name"] == Path(name).stem


def test_dicom_footprint_is_recorded_per_axis(extracted, slides_dir):
    out, _ = extracted
    a = trident_read(feature_path(out, "prostate-small.dcm"))["attrs"]
    # 4.64 x 5.69 um/px: at 2 um/px a 224 px tile covers 97 x 79 level-0 pixels
    assert tuple(a["patch_size_level0_xy"]) == (97, 79)
    assert a["patch_size_level0"] == 97
    # and at the default 0.5 um/px, the 24 x 20 px footprint of the issue (attributes only: the
    # 17 k tiles of that grid would take minutes through the backbone here)
    with open_slide(slides_dir / "prostate-small.dcm") as s:
        fp = s.level0_tile_size(224, 0.5)
        attrs = coords_attributes(name="prostate-small", tile_size=224, target_mpp=0.5, level0_size=fp,
                                  stride=fp, slide_dimensions=s.dimensions, mpp=s.mpp)
    assert fp == (24, 20)
    assert tuple(attrs["patch_size_level0_xy"]) == (24, 20) and attrs["patch_size_level0"] == 24
    assert attrs["target_magnification"] == 20 and isinstance(attrs["target_magnification"], Integral)
    assert abs(224 * (10 / attrs["target_magnification"]) / (10 / attrs["level0_magnification"]) - 24) < 1


def test_overlap_is_in_target_pixels():
    attrs = coords_attributes(name="s", tile_size=224, target_mpp=0.5, level0_size=(448, 448),
                              stride=(384, 384), slide_dimensions=(5000, 4000), mpp=(0.25, 0.25))
    assert attrs["overlap"] == 32 and attrs["level0_magnification"] == 40
    assert attrs["patch_size_level0"] == 448


def test_clam_reader_reads_our_files(extracted):
    out, names = extracted
    written = write_clam_layout(out)
    assert sorted(p.name for p in written) == ["cmu-1-small-region.pt", "prostate-small.pt"]
    assert (out / "h5_files").is_symlink()
    for name in names:
        stem = Path(name).stem
        got = clam_read(out, stem)
        ours = read_features(feature_path(out, name))
        np.testing.assert_array_equal(got["pt"], ours.features)
        np.testing.assert_array_equal(got["features"], ours.features)
        np.testing.assert_array_equal(got["coords"], ours.coords)
        assert got["patch_level"] == 0 and got["patch_size"] == 224 and got["name"] == stem
    # a second call rewrites nothing (the .pt files are newer than their .h5)
    assert write_clam_layout(out) == []


def trident_processor_finds(job_dir: Path, coords_dir: str, encoder: str, wsi_name: str) -> dict:
    """Trident's ``Processor`` (trident/Processor.py): ``run_patch_feature_extraction_job`` skips a slide
    whose ``<job_dir>/<coords_dir>/features_<encoder>/<name>.h5`` exists ("already extracted") and reads
    coordinates from ``<job_dir>/<coords_dir>/patches/<name>_patches.h5``; the slide-feature job loads
    that features file (``WSI.extract_slide_features``: ``features``, ``coords``, ``coords.attrs`` with
    ``patch_size_level0`` cast to int), and CARE / TITAN / GigaPath place tiles at
    ``coords // patch_size_level0``"""
    feats = job_dir / coords_dir / f"features_{encoder}" / f"{wsi_name}.h5"
    patches = job_dir / coords_dir / "patches" / f"{wsi_name}_patches.h5"
    assert feats.is_file() and patches.is_file(), (feats, patches)
    with h5py.File(feats, "r") as f:
        coords, features, attrs = f["coords"][:], f["features"][:], dict(f["coords"].attrs)
    with h5py.File(patches, "r") as f:
        np.testing.assert_array_equal(f["coords"][:], coords)
    grid = coords // int(attrs["patch_size_level0"])
    return {"features": features, "coords": coords, "attrs": attrs, "grid": grid}


def test_trident_processor_finds_our_features_with_unique_grid_cells(tmp_path, slides_dir, runner):
    """overlapping tiles (triage's 64 px overlap): in features/ CARE's grid would put several tiles in one
    cell; the Trident layout's patch_size_level0 is the tiles' step, so every tile keeps its own cell"""
    out = tmp_path / "job" / "20x_224px_64px_overlap"
    tiling = TilingConfig(target_mpp=2.0, overlap=64 / 224)
    cfg = ExtractConfig(tiling=tiling, scheduler=SchedulerConfig(batch_tiles=16))
    [done] = extract_features([slides_dir / "cmu-1-small-region.svs"], out, runner, cfg)
    assert isinstance(done, SlideDone)
    ours = read_features(feature_path(out, "cmu-1-small-region.svs"))
    naive = ours.coords // int(ours.coords_attrs["patch_size_level0"])
    assert len(np.unique(naive, axis=0)) < len(naive)  # the collision the layout avoids
    written = write_trident_layout(out)
    assert [p.relative_to(out).as_posix() for p in written] == ["features_tiny/cmu-1-small-region.h5"]
    got = trident_processor_finds(tmp_path / "job", out.name, "tiny", "cmu-1-small-region")
    np.testing.assert_array_equal(got["features"], ours.features)
    np.testing.assert_array_equal(got["coords"], ours.coords)
    assert len(np.unique(got["grid"], axis=0)) == len(got["grid"])  # one tile per grid cell
    a = got["attrs"]
    stride = ours.attrs["stride_level0"]
    assert tuple(a["step_level0"]) == tuple(stride) and a["patch_size_level0"] == min(stride)
    assert a["patch_footprint_level0"] == ours.coords_attrs["patch_size_level0"] and a["overlap"] == 64
    assert write_trident_layout(out) == []  # up to date: nothing rewritten


def test_clam_layout_refuses_to_replace_a_folder(tmp_path):
    (tmp_path / "features").mkdir()
    (tmp_path / "h5_files").mkdir()
    with pytest.raises(ValueError, match="h5_files: exists and is not a link"):
        write_clam_layout(tmp_path)
    with pytest.raises(ValueError, match="no feature folder"):
        write_clam_layout(tmp_path / "nowhere")


def test_extract_features_inside_a_running_event_loop(tmp_path, slides_dir, runner):
    import asyncio

    async def notebook_cell():
        return extract_features([slides_dir / "cmu-1-small-region.svs"], tmp_path, runner, COARSE)

    [res] = asyncio.run(notebook_cell())
    assert isinstance(res, SlideDone) and res.tiles > 0
    assert read_features(feature_path(tmp_path, "cmu-1-small-region.svs")).features.shape[0] == res.tiles
