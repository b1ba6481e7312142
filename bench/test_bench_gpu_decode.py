"""GPU read path (``gpu`` marker): CPU decode (the slide's backend + Pillow resample) beside nvJPEG (DALI,
torchvision) and cuCIM GPU decode (+ matrix resample on the GPU), same real tiles, in tiles/s.

Group ``read-tiles-decode-<mpp>``: 0.5 um/px (no resampling on the CMU slide) and 0.7 um/px (a
1.4x antialiased reduction). The GPU rounds end with ``torch.cuda.synchronize()``. ``extra_info`` has
the mean absolute difference to the CPU pixels (must stay <= 1 grey level) and what
:func:`choose_decoder` would pick, with the host path's tiles/s it measured (so the GPU check can leave
the ``cpu-backend`` rows out and still compare). The slide is small (130 JPEG tiles), so the tile set
is repeated to 1,024 reads to give the GPU batches of realistic size.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchutil import record
from cellvit_optimus.engine.wsi import gpu_decode as gd
from cellvit_optimus.engine.wsi.slide import open_slide
from cellvit_optimus.engine.wsi.tissue import tile_grid

N_TILES = 1024


@pytest.fixture(scope="module")
def slide(slides_dir):
    with open_slide(slides_dir / "cmu-1-small-region.svs", num_workers=8) as s:
        yield s


@pytest.fixture(scope="module")
def locations(slide):
    coords = [tuple(map(int, c)) for c in tile_grid(slide).coords]
    return (coords * (N_TILES // len(coords) + 1))[:N_TILES]


@pytest.mark.gpu
@pytest.mark.parametrize("mpp", [0.5, 0.7])
@pytest.mark.parametrize("decoder", ["cpu-backend", *gd.GPU_DECODERS])
def test_read_tiles_decode(benchmark, slide, locations, decoder, mpp):
    import torch

    benchmark.group = f"read-tiles-decode-{mpp}"
    if decoder == "cpu-backend":
        out = benchmark.pedantic(lambda: slide.read_tiles(locations, 224, mpp), rounds=5, warmup_rounds=1)
        benchmark.extra_info.update(decoder=f"cpu ({slide.backend})")
    else:
        if decoder not in gd.gpu_decoders_available():
            pytest.skip(f"{decoder} not installed")
        reader = gd.GpuTileReader(slide, decoder=decoder, max_batch=256)

        def run():
            t = reader.read_tiles(locations, 224, mpp)
            torch.cuda.synchronize()
            return t

        out = benchmark.pedantic(run, rounds=5, warmup_rounds=1).cpu().numpy()
        ref = slide.read_tiles(locations[:128], 224, mpp)
        diff = float(np.abs(out[:128].astype(int) - ref).mean())
        choice = gd.choose_decoder(slide, locations, 224, mpp, gpu_reader=reader, batch_size=256)
        benchmark.extra_info.update(decoder=decoder, device=torch.cuda.get_device_name(),
                                    mean_abs_diff_vs_cpu=round(diff, 4), choose_decoder=choice.decoder,
                                    choose_reason=choice.reason, cpu_tiles_per_s=choice.cpu_tiles_per_s,
                                    fallbacks=reader.fallbacks)
        assert diff <= 1.0
        reader.close()
    assert out.shape == (N_TILES, 224, 224, 3)
    record(benchmark, tiles=N_TILES, mp=round(N_TILES * 224 * 224 / 1e6, 3))
