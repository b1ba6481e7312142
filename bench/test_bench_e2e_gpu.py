"""GPU end to end (``gpu`` marker): a large slide through H-optimus-0, against the backbone alone.

The slide is generated from real CMU-1 tissue patches (tests/bigslide.py: a 48 x 48 tile JPEG pyramid,
about 2,000 tissue tiles at 0.5 um/px), so the read path does real JPEG decoding. The backbone is the
H-optimus-0 architecture, random init (the gated weights are not needed to time it), FP16 with CUDA
graphs at the batch size fitted to the default 12 GB budget.

* ``backbone-only``: the same tiles already in host memory, batch after batch from a worker thread
  (as the scheduler calls it), synchronised at the end: the floor.
* ``end-to-end[slide]`` / ``[nvjpeg]`` / ``[dali]`` / ``[cucim]`` / ``[auto]``: :func:`extract_features`
  (open, tissue grid, read, quality, backbone, HDF5) with the host slide reader, with each GPU decoder
  installed (nvjpeg, torchvision's, is in every CUDA torch image), and with the automatic read path,
  which takes GPU JPEG decoding when it measures faster on this slide (``extra_info["decoder"]`` says
  which ran; the GPU check leaves ``auto`` out, it repeats one of the others).

``extra_info["e2e_over_backbone"]`` is end-to-end tiles/s over backbone-only tiles/s measured in the
same test (goal >= 0.95: the read path keeps the GPU fed); ``stages`` holds the per-stage seconds of the
timed rounds: the slide's ``read_s``, ``consume_s`` and the device-timed ``h2d_s``/``backbone_s`` (CUDA
events) from the scheduler, and the runner's totals. Run:
``pytest bench/test_bench_e2e_gpu.py --benchmark-only -m gpu`` on a CUDA machine.

``OPTIMUS_BENCH_BIG_SLIDE`` names a big slide already built (the GPU check builds it in the background
while the backbone benches run); ``OPTIMUS_BENCH_BIG_TILES`` (default 48) sets the side of the one built
here, in 256-pixel tiles.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from benchutil import record
from cellvit_optimus.engine.pipeline.extract import ExtractConfig, extract_features
from cellvit_optimus.engine.pipeline.scheduler import SchedulerConfig
from cellvit_optimus.engine.wsi.slide import open_slide
from cellvit_optimus.engine.wsi.tissue import tile_grid

pytestmark = pytest.mark.gpu


BIG_TILES = int(os.environ.get("OPTIMUS_BENCH_BIG_TILES", "48"))


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory, slides_dir):
    from bigslide import make_big_slide

    ready = os.environ.get("OPTIMUS_BENCH_BIG_SLIDE")
    if ready and Path(ready).is_file():
        return Path(ready)
    return make_big_slide(tmp_path_factory.mktemp("big") / "big.tiff", BIG_TILES, BIG_TILES,
                          slides_dir / "cmu-1-small-region.svs")


@pytest.fixture(scope="module")
def runner(hoptimus0_cpu):
    import copy

    from cellvit_optimus.engine.pipeline.runner import BackboneRunner

    # a copy of the session's one CPU init: the runner casts and moves it in place
    r = BackboneRunner("hoptimus0", device="cuda", dtype="fp16", tokens=False,
                       backbone=copy.deepcopy(hoptimus0_cpu))
    r.capture(tokens=False)
    return r


@pytest.fixture(scope="module")
def tiles(big_slide):
    with open_slide(big_slide) as s:
        grid = tile_grid(s)
        return s.read_tiles([tuple(map(int, c)) for c in grid.coords], 224, 0.5)


def _backbone_only(runner, tiles) -> float:
    import torch
    from concurrent.futures import ThreadPoolExecutor

    def run() -> None:
        for i in range(0, len(tiles), runner.batch_size):
            runner(tiles[i : i + runner.batch_size], tokens=False)
        torch.cuda.synchronize()

    t = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(run).result()
    return time.perf_counter() - t


@pytest.mark.benchmark(group="e2e-gpu-hoptimus0")
def test_gpu_backbone_only(benchmark, runner, tiles):
    benchmark.pedantic(_backbone_only, args=(runner, tiles), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(stage="backbone-only (tiles in host memory)", batch=runner.batch_size)
    record(benchmark, tiles=len(tiles))


@pytest.mark.benchmark(group="e2e-gpu-hoptimus0")
@pytest.mark.parametrize("decoder", ["slide", "nvjpeg", "dali", "cucim", "auto"])
def test_gpu_extract_end_to_end(benchmark, runner, tiles, big_slide, tmp_path, decoder):
    from cellvit_optimus.engine.wsi.gpu_decode import gpu_decoders_available

    if decoder not in ("slide", "auto") and decoder not in gpu_decoders_available():
        pytest.skip(f"{decoder} not installed")
    workers = max(2, min(8, (os.cpu_count() or 2) // 2))
    cfg = ExtractConfig(decoder=decoder, scheduler=SchedulerConfig(
        batch_tiles=runner.batch_size, reader_threads=workers, decode_workers=2, queue_batches=4))
    runs = iter(range(100))
    seen: dict = {}

    def once():  # a fresh folder each round: the feature cache must not serve the slide
        [res] = extract_features([big_slide], tmp_path / f"run{next(runs)}", runner, cfg)
        assert res.tiles == len(tiles), res
        seen.update(res.info)
        return res

    runner.stage_times.reset()
    res = benchmark.pedantic(once, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(stage="extract end to end", decoder=seen.get("decoder"),
                                decoder_reason=seen.get("decoder_reason"), reader_threads=workers,
                                timings={k: round(v, 4) for k, v in res.timings.items()},
                                runner_stages_4_rounds=runner.stage_times.totals(wait=True))
    if decoder != "slide":
        assert seen.get("decoder_fallback") is None, seen.get("decoder_fallback")
    mean = record(benchmark, tiles=len(tiles))
    if mean is not None:
        floor = statistics.median(_backbone_only(runner, tiles) for _ in range(3))
        benchmark.extra_info["backbone_only_tiles_per_s"] = round(len(tiles) / floor, 1)
        benchmark.extra_info["e2e_over_backbone"] = round(floor / mean, 3)
        print(f"\n{decoder} ({seen.get('decoder')}): e2e {len(tiles) / mean:.0f} tiles/s, backbone only "
              f"{len(tiles) / floor:.0f} tiles/s -> {floor / mean:.3f}")
    assert np.isfinite(res.timings["total_s"])
