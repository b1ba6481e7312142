"""Feature extraction through the scheduler, on the real slides, with the `tiny` preset on the CPU."""

from __future__ import annotations

import hashlib
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from killing import kill_during_second_slide

from cellvit_optimus.engine.pipeline.extract import ExtractConfig, extract_features, feature_path
from cellvit_optimus.engine.pipeline.features import read_features
from cellvit_optimus.engine.wsi.inspect import Failure
from cellvit_optimus.engine.pipeline.scheduler import SchedulerConfig, SlideDone
from cellvit_optimus.engine.wsi.slide import open_slide
from cellvit_optimus.engine.wsi.tissue import TilingConfig, tile_grid

# coarse tiles keep the DICOM slide (4.6 um/px, thousands of 0.5 um/px tiles) quick on two CPU cores
COARSE = ExtractConfig(tiling=TilingConfig(target_mpp=2.0), scheduler=SchedulerConfig(batch_tiles=16))
MPP = {"tcga-cr-7395-01a-01-ts1.svs": 0.25, "kidney-48-5.tif": 0.5, "small-he-levels.tiff": 0.5}


@pytest.fixture(scope="module")
def runner():
    from cellvit_optimus.engine.pipeline.runner import BackboneRunner

    return BackboneRunner("tiny", device="cpu")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _per_slide_config(name: str, base: ExtractConfig) -> ExtractConfig:
    return ExtractConfig(tiling=base.tiling, tissue=base.tissue, scheduler=base.scheduler, mpp=MPP.get(name))


@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "prostate-small.dcm",
                                  "kidney-48-5.tif", "small-he-levels.tiff"])
def test_every_real_slide(tmp_path, slides_dir, runner, name):
    cfg = _per_slide_config(name, COARSE)
    [res] = extract_features([slides_dir / name], tmp_path, runner, cfg)
    if name in ("kidney-48-5.tif", "small-he-levels.tiff"):  # blank glass / colour patches: no tissue
        assert isinstance(res, Failure) and res.reason == "no tissue"
        assert not (tmp_path / "features").exists() or not list((tmp_path / "features").iterdir())
        return
    assert isinstance(res, SlideDone) and not res.cached
    f = read_features(feature_path(tmp_path, name))
    with open_slide(slides_dir / name, mpp=cfg.mpp) as s:
        grid = tile_grid(s, cfg.tiling, cfg.tissue)
    np.testing.assert_array_equal(f.coords, grid.coords)  # the foundation stage's tissue grid, in order
    np.testing.assert_array_equal(f.arrays["grid_index"], grid.grid_index)
    assert f.features.shape == (len(grid), 192) and np.isfinite(f.features).all()
    # every tile got its own embedding (random-init LayerScale keeps them close, but never equal)
    assert len(np.unique(f.features, axis=0)) == len(grid)
    assert f.attrs["complete"] and f.attrs["backbone"] == "tiny"
    assert f.attrs["patch_size"] == 224 and f.attrs["target_mpp"] == 2.0
    assert f.attrs["patch_size_level0"] == grid.level0_size[0]
    assert f.arrays["quality/blur"].shape == (len(grid),)


def test_deterministic_and_cached(tmp_path, slides_dir, runner):
    paths = [slides_dir / "cmu-1-small-region.svs", slides_dir / "prostate-small.dcm"]
    a, b = tmp_path / "a", tmp_path / "b"
    extract_features(paths, a, runner, COARSE)
    calls = runner.calls
    extract_features(paths, b, runner, COARSE)
    assert runner.calls > calls
    for p in paths:  # two independent runs: byte-identical files
        assert _sha(feature_path(a, p)) == _sha(feature_path(b, p))
    before = runner.calls
    again = extract_features(paths, a, runner, COARSE)
    assert runner.calls == before  # the rerun made no backbone call
    assert [r.cached for r in again] == [True, True]
    # a different preprocessing is a different cache key: recomputed
    changed = ExtractConfig(tiling=TilingConfig(target_mpp=2.0, overlap=0.25), scheduler=COARSE.scheduler)
    [r] = extract_features(paths[:1], a, runner, changed)
    assert not r.cached and runner.calls > before


def test_a_bad_slide_fails_alone(tmp_path, slides_dir, runner):
    notes = tmp_path / "notes.svs"
    notes.write_text("not a slide")
    data = (slides_dir / "cmu-1-small-region.svs").read_bytes()
    trunc = tmp_path / "trunc.svs"
    trunc.write_bytes(data[: len(data) // 2])
    paths = [notes, slides_dir / "cmu-1-small-region.svs", trunc, tmp_path / "missing.svs"]
    res = extract_features(paths, tmp_path / "out", runner, COARSE)
    assert [type(r).__name__ for r in res] == ["Failure", "SlideDone", "Failure", "Failure"]
    assert [getattr(r, "reason", None) for r in res] == ["not a slide", None, "truncated or corrupt", "not found"]
    assert sorted(p.name for p in (tmp_path / "out" / "features").iterdir()) == ["cmu-1-small-region.h5"]


def test_read_failure_mid_slide_leaves_no_partial_file(tmp_path, slides_dir, runner):
    """a slide whose tiles stop decoding half-way is recorded; its half-written file is removed"""
    from cellvit_optimus.engine.pipeline.extract import FeatureExtractor, build_extractor, open_job_for  # noqa: F401
    from cellvit_optimus.engine.pipeline.scheduler import BatchOutput, run_pipeline
    from cellvit_optimus.engine.wsi.tissue import tile_quality

    import anyio

    cfg = ExtractConfig(scheduler=SchedulerConfig(batch_tiles=8))
    extractor = build_extractor(runner, tmp_path, cfg)
    seen = {"n": 0}

    def flaky_read(job, idx):
        seen["n"] += 1
        if job.path.name.startswith("cmu") and seen["n"] > 3:
            raise OSError("simulated decode failure")
        tiles = job.slide.read_tiles([tuple(c) for c in job.grid.coords[idx].tolist()], 224, 0.5)
        return tiles, tile_quality(tiles)

    async def main():
        paths = [slides_dir / "cmu-1-small-region.svs"]
        async with run_pipeline(paths, open_job=open_job_for(cfg), factory=extractor,
                                compute=lambda t: BatchOutput(runner(t, tokens=False).embedding), config=cfg.scheduler,
                                read_tiles=flaky_read) as results:
            return [r async for r in results]

    [res] = anyio.run(main)
    assert isinstance(res, Failure) and "simulated decode failure" in res.message
    assert not list((tmp_path / "features").glob("*"))


def test_cancellation_cleans_up(tmp_path, slides_dir, runner):
    import anyio

    from cellvit_optimus.engine.pipeline.extract import aextract_features

    cfg = ExtractConfig(scheduler=SchedulerConfig(batch_tiles=4))

    async def main():
        with anyio.move_on_after(1.5):
            async for _ in aextract_features([slides_dir / "cmu-1-small-region.svs"], tmp_path, runner, cfg):
                pass
        return True

    assert anyio.run(main)
    leftovers = list((tmp_path / "features").glob("*")) if (tmp_path / "features").exists() else []
    assert leftovers == [] or [p.name for p in leftovers] == ["cmu-1-small-region.h5"]


def test_backpressure_bounds_tiles_in_memory(tmp_path, slides_dir, runner):
    """with a slow backbone, readers stall instead of piling tiles up in memory"""
    import threading

    from cellvit_optimus.engine.pipeline.scheduler import BatchOutput, run_pipeline
    from cellvit_optimus.engine.wsi.tissue import tile_quality

    import anyio

    from cellvit_optimus.engine.pipeline.extract import build_extractor, open_job_for

    sched = SchedulerConfig(batch_tiles=4, queue_batches=2, reader_threads=2)
    cfg = ExtractConfig(scheduler=sched)
    alive = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def counting_read(job, idx):
        tiles = job.slide.read_tiles([tuple(c) for c in job.grid.coords[idx].tolist()], 224, 0.5)
        with lock:
            alive["now"] += 1
            alive["peak"] = max(alive["peak"], alive["now"])
        return tiles, tile_quality(tiles)

    def slow_compute(tiles):
        time.sleep(0.05)
        out = runner(tiles, tokens=False)
        with lock:
            alive["now"] -= 1
        return BatchOutput(out.embedding)

    async def main():
        async with run_pipeline([slides_dir / "cmu-1-small-region.svs"], open_job=open_job_for(cfg),
                                factory=build_extractor(runner, tmp_path, cfg), compute=slow_compute,
                                config=sched, read_tiles=counting_read) as results:
            return [r async for r in results]

    [res] = anyio.run(main)
    assert isinstance(res, SlideDone) and res.tiles == 64  # 16 batches went through
    # read batches not yet computed: the tile stream (2) + one held per reader (2) + one waiting at the
    # backbone, one being handed to it and one in the forward (scheduler docstring)
    assert alive["peak"] <= sched.queue_batches + sched.reader_threads + 3


def test_progress_reports_tiles_per_second(tmp_path, slides_dir, runner):
    seen = []
    extract_features([slides_dir / "cmu-1-small-region.svs"], tmp_path, runner, COARSE, progress=seen.append)
    last = seen[-1]
    assert last.slides_done == last.slides_total == 1
    assert last.tiles_done == last.tiles_total > 0 and last.tiles_per_s > 0


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from cellvit_optimus.engine.pipeline.extract import ExtractConfig, extract_features
    from cellvit_optimus.engine.pipeline.runner import BackboneRunner
    from cellvit_optimus.engine.pipeline.scheduler import SchedulerConfig
    from cellvit_optimus.engine.wsi.tissue import TilingConfig
    cfg = ExtractConfig(tiling=TilingConfig(target_mpp=float(sys.argv[3])),
                        scheduler=SchedulerConfig(batch_tiles=8, slides_in_flight=1))
    def progress(p):
        print(p.slides_done, p.tiles_done, p.tiles_total, flush=True)
    extract_features(sys.argv[4:], sys.argv[1], BackboneRunner("tiny"), cfg, progress=progress)
    open(sys.argv[2], "w").write("done")
""")


@pytest.mark.slow
def test_sigkill_mid_slide_then_rerun_gives_the_same_files(tmp_path, slides_dir, runner):
    paths = [str(slides_dir / "cmu-1-small-region.svs"), str(slides_dir / "prostate-small.dcm")]
    mpp = "2.0"  # ~500 DICOM tiles: enough batches to die in the middle of
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    kill_during_second_slide([sys.executable, "-c", KILL_SCRIPT, str(killed), str(tmp_path / "done"), mpp, *paths])
    assert feature_path(killed, paths[0]).exists()
    assert list((killed / "features").glob(".tmp-prostate-small.h5.*"))  # the killed slide's temporary
    assert not (tmp_path / "done").exists()
    assert not feature_path(killed, paths[1]).exists()  # no partial file under the final name

    cfg = ExtractConfig(tiling=TilingConfig(target_mpp=float(mpp)), scheduler=SchedulerConfig(batch_tiles=8))
    before = runner.tiles_processed
    resumed = extract_features(paths, killed, runner, cfg)
    assert [r.cached for r in resumed] == [True, False]  # the finished slide was not recomputed
    assert runner.tiles_processed - before == resumed[1].tiles  # only the interrupted slide's tiles
    extract_features(paths, clean, runner, cfg)
    for p in paths:
        assert _sha(feature_path(killed, p)) == _sha(feature_path(clean, p))
    assert not list((killed / "features").glob(".tmp-*"))  # the stale temporary was cleaned up


def test_one_extractor_builder_keys_the_stain_normaliser(tmp_path, runner):
    """extraction and triage build their FeatureExtractor in one place: the cache key names the stain
    normaliser when there is one, so features made with and without it never pass for each other"""
    from cellvit_optimus.engine.pipeline.extract import build_extractor
    from cellvit_optimus.engine.pipeline.runner import BackboneRunner

    def halve(t):
        return t * 0.5

    plain = build_extractor(runner, tmp_path, COARSE)
    stained = build_extractor(BackboneRunner("tiny", stain_norm=halve, backbone=runner.backbone), tmp_path, COARSE)
    norm = plain.preprocessing["normalisation"]
    assert norm == {"mean": list(runner.preset.mean), "std": list(runner.preset.std), "dtype": runner.dtype}
    assert stained.preprocessing["normalisation"] == {**norm, "stain_norm": "halve"}
    from cellvit_optimus.engine.pipeline.features import preprocessing_hash

    assert preprocessing_hash(plain.preprocessing) != preprocessing_hash(stained.preprocessing)
