"""Slide readers side by side: the same 64 real tissue tiles read by cuCIM, tiffslide and OpenSlide.

Groups: ``read-single`` (one read_region call per tile) and ``read-batched`` (one batched call for all
tiles; cuCIM decodes the batch on worker threads, the others loop). ``extra_info['tiles_per_s']`` is
derived from the mean round time. Compare ratios within a group; absolute times on shared CPUs are noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from cellvit_optimus.engine.wsi.slide import available_backends, open_slide
from cellvit_optimus.engine.wsi.tissue import tile_grid

N_TILES = 64
BACKENDS = [b for b in ("cucim", "tiffslide", "openslide") if b in available_backends()]


@pytest.fixture(scope="module")
def locations(slides_dir):
    with open_slide(slides_dir / "cmu-1-small-region.svs") as s:
        coords = tile_grid(s).coords
    rng = np.random.default_rng(0)
    return [tuple(map(int, c)) for c in coords[rng.choice(len(coords), N_TILES, replace=len(coords) < N_TILES)]]


def _record(benchmark, backend, mode):
    benchmark.extra_info.update(backend=backend, mode=mode, tiles=N_TILES)

    def finish():
        if benchmark.stats is not None:
            benchmark.extra_info["tiles_per_s"] = N_TILES / benchmark.stats.stats.mean

    return finish


@pytest.mark.benchmark(group="read-single")
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_single(benchmark, slides_dir, locations, backend):
    slide = open_slide(slides_dir / "cmu-1-small-region.svs", backend=backend)
    finish = _record(benchmark, backend, "single")

    def run():
        for loc in locations:
            slide.read_region(loc, 0, (224, 224))

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    finish()
    ref = open_slide(slides_dir / "cmu-1-small-region.svs", backend="tiffslide")
    assert np.array_equal(slide.read_region(locations[0], 0, (224, 224)), ref.read_region(locations[0], 0, (224, 224)))


@pytest.mark.benchmark(group="read-batched")
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_batched(benchmark, slides_dir, locations, backend):
    slide = open_slide(slides_dir / "cmu-1-small-region.svs", backend=backend, num_workers=2)
    finish = _record(benchmark, backend, "batched")
    out = benchmark.pedantic(lambda: slide.read_regions(locations, 0, (224, 224)), rounds=5, warmup_rounds=1)
    finish()
    assert out.shape == (N_TILES, 224, 224, 3)


@pytest.mark.benchmark(group="read-tiles-0.5mpp")
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_tiles_at_target_mpp(benchmark, slides_dir, locations, backend):
    slide = open_slide(slides_dir / "cmu-1-small-region.svs", backend=backend, num_workers=2)
    finish = _record(benchmark, backend, "tiles@0.5mpp")
    out = benchmark.pedantic(lambda: slide.read_tiles(locations, 224, 0.5), rounds=5, warmup_rounds=1)
    finish()
    assert out.shape == (N_TILES, 224, 224, 3)


@pytest.fixture(scope="module")
def jpeg_tiles(slides_dir):
    """the 130 level-0 tiles of CMU-1-small-region as full JPEG streams (JPEGTables spliced in)"""
    import tifffile

    path = slides_dir / "cmu-1-small-region.svs"
    blob = path.read_bytes()
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        head = bytes(page.jpegtables)[:-2]
        return [head + blob[o + 2:o + c] for o, c in zip(page.dataoffsets, page.databytecounts)]


@pytest.mark.benchmark(group="tile-check")
@pytest.mark.parametrize("how", ["full-decode", "strict-eighth", "scan-walk", "strict-eighth+scan-walk"])
def test_tile_check_cost(benchmark, jpeg_tiles, how):
    """what the corrupt-tile check costs next to a full decode of the same tiles (one thread)"""
    import simplejpeg
    from cellvit_optimus.engine.wsi.jpegcheck import strict_decode
    from cellvit_optimus.kernels import jpeg_scan_check

    jpeg_scan_check(jpeg_tiles[0])  # compile outside the timing
    one = {
        "full-decode": lambda t: simplejpeg.decode_jpeg(t, colorspace="RGB"),
        "strict-eighth": lambda t: simplejpeg.decode_jpeg(t, colorspace="RGB", min_factor=8, min_height=1,
                                                          min_width=1, strict=True),
        "scan-walk": jpeg_scan_check,
        "strict-eighth+scan-walk": strict_decode,
    }[how]
    benchmark.extra_info.update(tiles=len(jpeg_tiles), check=how)
    benchmark.pedantic(lambda: [one(t) for t in jpeg_tiles], rounds=10, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["ms_per_tile"] = 1e3 * benchmark.stats.stats.mean / len(jpeg_tiles)
