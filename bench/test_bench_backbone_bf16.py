"""Backbone in BF16 (``gpu`` marker): our runner on H-optimus-0 (random init) with and without CUDA graphs
at the batch sizes of test_bench_backbone.py, recording tiles/s and achieved FLOP/s as a fraction of the
device's dense 16-bit tensor peak (BF16 and FP16 peaks are equal on A100/H100/H200/L4/L40S). Compare with
the ``backbone-gpu-hoptimus0-b<batch>`` groups (FP16) from the same run.
"""

from __future__ import annotations

import gc

import pytest

from test_bench_backbone import GPU_BATCHES, _record, make_tiles  # type: ignore[import-not-found]


@pytest.fixture(scope="module")
def hopt_bf16(hoptimus0_cpu):
    """a copy of the session's one CPU init (the runners cast and move it in place)"""
    import copy

    return copy.deepcopy(hoptimus0_cpu)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("batch", GPU_BATCHES)
def test_gpu_hoptimus0_runner_bf16(benchmark, hopt_bf16, batch, graphs):
    import torch

    from cellvit_optimus.engine.pipeline.runner import BackboneRunner
    from cellvit_optimus.heads import PRESETS

    benchmark.group = f"backbone-gpu-hoptimus0-bf16-b{batch}"
    runner = BackboneRunner("hoptimus0", device="cuda", dtype="bf16", batch_size=batch, use_cuda_graphs=graphs,
                            capture_sizes=(batch,), backbone=hopt_bf16)
    x = make_tiles(batch)
    runner.capture()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(lambda: (runner(x), torch.cuda.synchronize()), rounds=10, warmup_rounds=2, iterations=1)
    benchmark.extra_info["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    tps = _record(benchmark, batch, PRESETS["hoptimus0"].flops_per_tile(), torch.cuda.get_device_name())
    benchmark.extra_info.update(mode="runner", dtype="bf16", graphs=graphs)
    if tps == tps:  # not NaN: the same number under the suite-wide key
        benchmark.extra_info["flops_fraction"] = benchmark.extra_info.get("fraction_of_fp16_peak")
    runner.release_graphs()
    runner = None  # (not del: the benchmarked lambda refers to the name)
    gc.collect()
    torch.cuda.empty_cache()
