"""Backbone throughput: timm's eager forward beside our BackboneRunner, in one benchmark group per setting.

CPU (runs anywhere): the ``tiny`` preset at one batch size; timm eager on a ready normalised float
tensor vs the runner from uint8 tiles (embeddings only, and with token maps).

GPU (``gpu`` marker): the H-optimus-0 architecture, random init, at batch sizes 16..256: timm eager
under fp16 autocast (the model card's recipe: fp32 weights), the runner without CUDA graphs and the
runner with them. Each records tiles/s, peak VRAM and achieved matmul FLOP/s as a fraction of the
device's dense FP16 tensor peak. A last check fits the batch size to a 12 GiB budget, captures every
graph size, and verifies that what the caching allocator reserved (what a 12 GiB card must hold, the
runner's weights included) stays under it.

Run: ``pytest bench/test_bench_backbone.py --benchmark-json bench/results/backbone.json``
(pytest-benchmark stores the machine info with the results).
"""

from __future__ import annotations

import copy
import gc
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from cellvit_optimus.engine.pipeline.runner import BackboneRunner
from cellvit_optimus.heads import PRESETS, Backbone, build_backbone

from benchutil import gpu_batches  # type: ignore[import-not-found]

CPU_BATCH = 32
GPU_BATCHES = gpu_batches((16, 32, 64, 128, 256))
GPU_BUDGET_GB = 12.0

#: dense (no sparsity) FP16 tensor-core peak FLOP/s with FP32 accumulation (what PyTorch's fp16 GEMMs
#: use), matched against torch.cuda.get_device_name() in order: first match wins
PEAK_FP16_DENSE_FLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200", 989e12),
    (r"GH200", 989e12),
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
    (r"A10G?\b", 125e12),
    # GeForce Ada runs FP16 with FP32 accumulation at half the FP16-accumulate rate: the RTX 4070 SUPER's
    # often quoted ~142 TFLOPS is the FP16-accumulate figure (224 tensor cores x 256 FLOP/clk x 2.475 GHz)
    (r"RTX 4070 SUPER", 70.9e12),
    (r"RTX 4090", 165.2e12),
)


def peak_fp16_flops(device_name: str) -> float | None:
    """Dense FP16 tensor peak of a GPU by name, None when unknown."""
    for pattern, flops in PEAK_FP16_DENSE_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


def make_tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def _record(benchmark, tiles: int, flops_per_tile: int, device_name: str | None = None) -> float:  # type: ignore[no-untyped-def]
    if benchmark.stats is None:  # --benchmark-disable (the CI smoke run): ran once, nothing to record
        return float("nan")
    mean = benchmark.stats.stats.mean
    tps = tiles / mean
    benchmark.extra_info["tiles_per_s"] = round(tps, 2)
    benchmark.extra_info["batch"] = tiles
    benchmark.extra_info["achieved_tflops"] = round(tps * flops_per_tile / 1e12, 3)
    if device_name is not None:
        peak = peak_fp16_flops(device_name)
        benchmark.extra_info["device"] = device_name
        benchmark.extra_info["fraction_of_fp16_peak"] = (
            None if peak is None else round(tps * flops_per_tile / peak, 4)
        )
    return tps


def test_peak_table() -> None:
    assert peak_fp16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_fp16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_fp16_flops("NVIDIA H200") == 989e12
    assert peak_fp16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_fp16_flops("NVIDIA L4") == 121e12
    assert peak_fp16_flops("NVIDIA L40S") == 362e12
    assert peak_fp16_flops("NVIDIA GeForce RTX 4070 SUPER") == 70.9e12
    assert peak_fp16_flops("Some Future GPU") is None


# -- CPU ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cpu() -> Backbone:
    return build_backbone("tiny", seed=0)


def test_cpu_tiny_timm_eager(benchmark, tiny_cpu: Backbone) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"backbone-cpu-tiny-b{CPU_BATCH}"
    p = PRESETS["tiny"]
    mean = torch.tensor(p.mean).view(1, 3, 1, 1)
    std = torch.tensor(p.std).view(1, 3, 1, 1)
    x = (
        (torch.from_numpy(make_tiles(CPU_BATCH)).permute(0, 3, 1, 2).float() / 255 - mean) / std
    ).contiguous()
    model = tiny_cpu.model

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    _record(benchmark, CPU_BATCH, p.flops_per_tile())


@pytest.mark.parametrize("tokens", [False, True], ids=["embed", "tokens"])
def test_cpu_tiny_runner(benchmark, tiny_cpu: Backbone, tokens: bool) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"backbone-cpu-tiny-b{CPU_BATCH}"
    runner = BackboneRunner("tiny", batch_size=CPU_BATCH, backbone=tiny_cpu)
    x = make_tiles(CPU_BATCH)
    benchmark.pedantic(lambda: runner(x, tokens=tokens), rounds=5, warmup_rounds=1, iterations=1)
    _record(benchmark, CPU_BATCH, PRESETS["tiny"].flops_per_tile())
    # one forward per round, warm-up included (disabled benchmarks run the function once)
    assert runner.calls == (1 if benchmark.disabled else 6)


# -- GPU ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hopt_cpu(hoptimus0_cpu: Backbone) -> Backbone:
    """H-optimus-0 architecture, random init, fp32 on the CPU (4.5 GB of host memory), built once per
    session (bench/conftest.py); never modified here, only copied."""
    return hoptimus0_cpu


@pytest.fixture(scope="module")
def hopt_runner_backbone(hopt_cpu: Backbone) -> Backbone:
    """One fp16 copy on the GPU shared by the runners (they cast and move it in place)."""
    return copy.deepcopy(hopt_cpu)


def _free_cuda() -> None:
    """drop what earlier benchmarks left: cached blocks and every stream's cuBLAS workspace (allocated
    through the caching allocator, 32 MiB per stream on Hopper, and not returned by empty_cache)"""
    gc.collect()
    torch.cuda.synchronize()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()


def _gpu_weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters() if t.is_cuda)


def _other_resident(model: torch.nn.Module) -> int:
    """Bytes allocated on the GPU that do not belong to ``model`` (e.g. the runners' shared copy)."""
    _free_cuda()
    return torch.cuda.memory_allocated() - _gpu_weight_bytes(model)


def _record_peak(benchmark, other: int) -> None:  # type: ignore[no-untyped-def]
    """Peak VRAM of this mode alone: the measured peak less what other models hold."""
    benchmark.extra_info["peak_vram_gb"] = round((torch.cuda.max_memory_allocated() - other) / 2**30, 3)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("batch", GPU_BATCHES)
def test_gpu_hoptimus0_timm_eager_fp16(benchmark, hopt_cpu: Backbone, batch: int) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"backbone-gpu-hoptimus0-b{batch}"
    p = PRESETS["hoptimus0"]
    model = copy.deepcopy(hopt_cpu.model).cuda()  # fp32 weights, fp16 autocast: the model card's recipe
    mean = torch.tensor(p.mean, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(p.std, device="cuda").view(1, 3, 1, 1)
    x = torch.from_numpy(make_tiles(batch)).cuda().permute(0, 3, 1, 2).float().div(255).sub(mean).div(std)

    def run(model: torch.nn.Module, x: torch.Tensor) -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            model(x)
        torch.cuda.synchronize()

    other = _other_resident(model)
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, args=(model, x), rounds=10, warmup_rounds=2, iterations=1)
    _record_peak(benchmark, other)
    _record(benchmark, batch, p.flops_per_tile(), torch.cuda.get_device_name())
    benchmark.extra_info.update(mode="timm-eager", dtype="fp16", graphs=False)
    del model, x
    _free_cuda()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("batch", GPU_BATCHES)
def test_gpu_hoptimus0_runner(benchmark, hopt_runner_backbone: Backbone, batch: int, graphs: bool) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"backbone-gpu-hoptimus0-b{batch}"
    p = PRESETS["hoptimus0"]
    other = _other_resident(hopt_runner_backbone)  # before the runner: its graphs count towards its peak
    runner = BackboneRunner(
        "hoptimus0",
        device="cuda",
        dtype="fp16",
        batch_size=batch,
        use_cuda_graphs=graphs,
        capture_sizes=(batch,),
        backbone=hopt_runner_backbone,
    )
    x = make_tiles(batch)
    runner.capture()

    def run(runner: BackboneRunner, x: np.ndarray) -> None:
        runner(x)
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, args=(runner, x), rounds=10, warmup_rounds=2, iterations=1)
    _record_peak(benchmark, other)
    _record(benchmark, batch, p.flops_per_tile(), torch.cuda.get_device_name())
    benchmark.extra_info.update(mode="runner", dtype="fp16", graphs=graphs,
                                graph_replays=runner.stats.graph_replays)
    assert runner.stats.graph_replays == (12 if graphs else 0)
    runner.release_graphs()
    del runner
    _free_cuda()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_hoptimus0_budget_batch_peaks_under_budget(benchmark, hopt_runner_backbone: Backbone) -> None:  # type: ignore[no-untyped-def]
    """The batch size fitted to a 12 GiB budget runs with all its graphs captured while the caching
    allocator holds under 12 GiB: the runner's weights plus everything it reserved (probe, warm-ups,
    graph pool, static outputs, cuBLAS workspace), less what other tests left resident."""
    benchmark.group = "backbone-gpu-hoptimus0-budget"
    _free_cuda()
    weights = _gpu_weight_bytes(hopt_runner_backbone)  # the shared copy: on the GPU if a runner had it
    other = torch.cuda.memory_reserved() - weights  # held by nothing of this runner's
    torch.cuda.reset_peak_memory_stats()
    runner = BackboneRunner(
        "hoptimus0", device="cuda", vram_budget_gb=GPU_BUDGET_GB, backbone=hopt_runner_backbone
    )
    runner.capture()  # every size up to the fitted batch, as a triage run would
    x = make_tiles(runner.batch_size)
    benchmark.pedantic(lambda: (runner(x), torch.cuda.synchronize()), rounds=5, warmup_rounds=1, iterations=1)
    held = torch.cuda.max_memory_reserved() - other
    predicted = runner.probe["predicted_peak_bytes"] if runner.probe else None
    benchmark.extra_info.update(
        batch_size=runner.batch_size,
        graphs=len(runner.captured_graphs),
        other_resident_mb=round(other / 2**20, 1),
        peak_allocated_gb=round((torch.cuda.max_memory_allocated() - other) / 2**30, 3),
        peak_reserved_gb=round(held / 2**30, 3),
        predicted_peak_gb=None if predicted is None else round(predicted / 2**30, 3),
        limit_gb=round(runner.probe["limit_bytes"] / 2**30, 3) if runner.probe else None,
    )
    _record(benchmark, runner.batch_size, PRESETS["hoptimus0"].flops_per_tile(), torch.cuda.get_device_name())
    runner.release_graphs()
    assert held < GPU_BUDGET_GB * 2**30, benchmark.extra_info
