"""A whole slide end to end, against its compute-only floor, in tiles/s.

``e2e-extract``: :func:`extract_features` on the bundled real slide (open, tissue grid, read + resample +
quality, tiny backbone, HDF5) beside the same backbone on the same tiles already read into memory.
``extra_info['e2e_over_backbone']`` is end-to-end tiles/s over backbone-only tiles/s, measured in one
run (the backbone-only forwards run in a worker thread, as the scheduler runs them): 1.0 means everything but the backbone is hidden behind it; on two CPU cores the reader threads
and the backbone share the cores, so expect less than 1 there. On a GPU run the ratio says whether
the read path (decode, resample) keeps the GPU fed.

``e2e-triage``: :class:`Engine` triage of the bundled slide (nuclei maps, HV post-processing, tags,
GeoJSON, overview), coarse nuclei resolution so it stays small on a CPU; skipped when the bundled nuclei
model is absent or unreadable (it is trained separately).

Under ``--benchmark-disable`` each runs once and the ratio is not computed.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from benchutil import record, record_ratio, smoke
from cellvit_optimus.engine.data import bundled_slide, default_nuclei_model
from cellvit_optimus.engine.errors import WeightsError
from cellvit_optimus.engine.pipeline.extract import ExtractConfig, extract_features
from cellvit_optimus.engine.pipeline.scheduler import SchedulerConfig
from cellvit_optimus.engine.wsi.slide import open_slide
from cellvit_optimus.engine.wsi.tissue import TilingConfig, tile_grid

BATCH = 32


@pytest.fixture(scope="module")
def runner():
    from cellvit_optimus.engine.pipeline.runner import BackboneRunner

    return BackboneRunner("tiny", batch_size=BATCH)


@pytest.fixture(scope="module")
def tiles():
    with open_slide(bundled_slide()) as s:
        grid = tile_grid(s, TilingConfig())
        return s.read_tiles([tuple(map(int, c)) for c in grid.coords], 224, 0.5)


def _forward_all(runner, tiles) -> None:
    for i in range(0, len(tiles), BATCH):
        runner(tiles[i : i + BATCH], tokens=False)


def _backbone_only(runner, tiles) -> None:
    """in a worker thread, as the scheduler calls the backbone: on this CPU machine the same torch
    forward measured ~1.3x faster from a worker thread than from the main thread"""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(_forward_all, runner, tiles).result()


@pytest.mark.benchmark(group="e2e-extract")
def test_backbone_only(benchmark, runner, tiles):
    benchmark.pedantic(_backbone_only, args=(runner, tiles), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(stage="backbone-only (tiles in memory)", backbone="tiny")
    record(benchmark, tiles=len(tiles))


@pytest.mark.benchmark(group="e2e-extract")
def test_extract_end_to_end(benchmark, runner, tiles, tmp_path):
    cfg = ExtractConfig(scheduler=SchedulerConfig(batch_tiles=BATCH, reader_threads=2))
    runs = iter(range(100))

    def once():  # a fresh output folder each round: the feature cache must not serve the slide
        [res] = extract_features([bundled_slide()], tmp_path / f"run{next(runs)}", runner, cfg)
        assert res.tiles == len(tiles), res
        return res

    res = benchmark.pedantic(once, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(stage="extract end to end", backbone="tiny",
                                timings={k: round(v, 4) for k, v in res.timings.items()})
    mean = record(benchmark, tiles=len(tiles))
    if mean is not None:  # backbone-only floor measured now, in the same load conditions
        floor = []
        for _ in range(3):
            t = time.perf_counter()
            _backbone_only(runner, tiles)
            floor.append(time.perf_counter() - t)
        benchmark.extra_info["backbone_only_tiles_per_s"] = round(len(tiles) / statistics.median(floor), 2)
        benchmark.extra_info["e2e_over_backbone"] = round(statistics.median(floor) / mean, 3)


def _bundled_slide_runs(engine, tmp_path):
    """a function that triages the bundled slide into a fresh output folder per call (never cached)"""
    runs = iter(range(100))

    def once():
        batch = engine.run([bundled_slide()], tmp_path / f"run{next(runs)}")
        assert batch.status == "complete", batch.failures
        return batch.results[0]

    return once


@pytest.mark.benchmark(group="e2e-triage")
def test_triage_end_to_end(benchmark, tmp_path):
    if not default_nuclei_model().is_file():
        pytest.skip(f"bundled nuclei model {default_nuclei_model()} absent (trained separately)")
    from cellvit_optimus.engine.triage.engine import Engine, TriageConfig

    try:
        engine = Engine(TriageConfig(nuclei_mpp=2.0, overlap_px=32))
    except (WeightsError, OSError) as exc:
        pytest.skip(f"bundled nuclei model unusable: {exc}")
    once = _bundled_slide_runs(engine, tmp_path)
    res = benchmark.pedantic(once, rounds=2, warmup_rounds=0)
    benchmark.extra_info.update(stage="triage end to end", nuclei_mpp=2.0, nuclei=res.nuclei, tag=res.tag,
                                timings={k: round(v, 4) for k, v in res.timings.items()})
    record(benchmark, tiles=res.tiles)


def _real_tiles(slides_dir, model, n: int):
    """``n`` real tissue tiles of CMU-1-Small-Region at ``model``'s tile size and nuclei MPP, drawn with a
    fixed seed (the same tiles for every parametrisation of a benchmark)"""
    import numpy as np

    with open_slide(slides_dir / "cmu-1-small-region.svs") as s:
        coords = tile_grid(s, TilingConfig(tile_size=model.tile_size, target_mpp=model.nuclei_mpp)).coords
        idx = np.random.default_rng(0).choice(len(coords), n, replace=len(coords) < n)
        return s.read_tiles([tuple(map(int, c)) for c in coords[idx]], model.tile_size, model.nuclei_mpp)


@pytest.mark.benchmark(group="nuclei-micro-batch")
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_nuclei_forward_micro_batch(benchmark, slides_dir, batch_size):
    """the bundled nuclei model (backbone + UNETR) on the same 32 real tissue tiles, split into forwards of
    ``batch_size``; ``extra_info['peak_rss_mib']`` is this process's peak so far (run the parametrisations
    in this order: 1 and 4 first, so a rise is the larger batch's)"""
    import resource

    if not default_nuclei_model().is_file():
        pytest.skip(f"bundled nuclei model {default_nuclei_model()} absent (trained separately)")
    from cellvit_optimus.engine.pipeline.nuclei import NucleiModel

    model = NucleiModel(batch_size=batch_size)
    tiles = _real_tiles(slides_dir, model, 32)
    model.forward(tiles[:batch_size])  # warm-up outside the timing
    benchmark.pedantic(lambda: model.forward(tiles), rounds=3, warmup_rounds=0)
    benchmark.extra_info.update(batch_size=batch_size,
                                peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    record(benchmark, tiles=len(tiles))


_TRIAGE_DTYPE_MEANS: dict[str, float] = {}


@pytest.mark.benchmark(group="e2e-triage-head-dtype")
@pytest.mark.parametrize("head_dtype", ["fp32", "bf16"])
def test_triage_warm_head_dtype(benchmark, tmp_path, head_dtype):
    """warm triage of the bundled slide with the nuclei decoder in fp32 (the default) and in bf16
    (``--head-dtype bf16``); ``extra_info['bf16_over_fp32']`` is the ratio of mean times (run fp32
    first). On a CPU without native bfloat16 the bf16 round is slower, which this ratio shows."""
    from cellvit_optimus.engine.pipeline.nuclei import cpu_has_native_bf16
    from cellvit_optimus.engine.triage.engine import Engine, TriageConfig

    if benchmark.disabled and head_dtype == "fp32":
        pytest.skip("smoke run: the fp32 path is test_triage_end_to_end's")
    engine = Engine(TriageConfig(), head_dtype=head_dtype)
    once = _bundled_slide_runs(engine, tmp_path)
    res = benchmark.pedantic(once, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(head_dtype=head_dtype, native_bf16=cpu_has_native_bf16(), nuclei=res.nuclei,
                                tag=res.tag, priority=round(res.priority, 4))
    record_ratio(benchmark, _TRIAGE_DTYPE_MEANS, head_dtype, record(benchmark, tiles=res.tiles), "fp32",
                 "bf16_over_fp32")


_HEAD_MEANS: dict[str, float] = {}


@pytest.mark.benchmark(group="nuclei-head-fused")
@pytest.mark.parametrize("head", ["as_trained", "fused"])
def test_nuclei_forward_head_fused(benchmark, slides_dir, head):
    """the bundled nuclei model on the same 32 real tissue tiles at the CPU micro-batch, with its UNETR head
    as trained (conv, batch norm, dropout; contiguous) and as ``NucleiModel`` runs it
    (``heads.unetr.fuse_for_inference``: folded, channels-last); ``extra_info['fused_over_as_trained']``
    is the ratio of mean times (run ``as_trained`` first)"""
    if not default_nuclei_model().is_file():
        pytest.skip(f"bundled nuclei model {default_nuclei_model()} absent (trained separately)")
    from cellvit_optimus.engine.pipeline.nuclei import NucleiModel
    from cellvit_optimus.heads.checkpoint import load_nuclei_head

    model = NucleiModel()
    if head == "as_trained":
        model.head = load_nuclei_head(model.path, backbone_id=model.metadata["backbone_id"]).head.eval()
    tiles = _real_tiles(slides_dir, model, smoke(benchmark, 32, 4))
    if not benchmark.disabled:
        model.forward(tiles[:model.batch_size])  # warm-up outside the timing
    benchmark.pedantic(lambda: model.forward(tiles), rounds=3, warmup_rounds=0)
    benchmark.extra_info.update(head=head, batch_size=model.batch_size)
    record_ratio(benchmark, _HEAD_MEANS, head, record(benchmark, tiles=len(tiles)), "as_trained",
                 "fused_over_as_trained")


_ARCH_MEANS: dict[str, float] = {}


@pytest.mark.benchmark(group="nuclei-arch-cost")
@pytest.mark.parametrize("arch", ["bundled", "decoder_x2", "patch8", "small_backbone"])
def test_nuclei_architecture_forward_cost(benchmark, arch):
    """what a larger nuclei model would cost per tile on this machine, as inference runs it (folded head,
    4 tiles a forward, 32 tiles): the bundled architecture (tiny ViT, patch 14, decoder 16/32/64/128),
    the decoder twice as wide (32/64/128/256, CellViT's ratios at half its width), a patch-8 token grid
    (28 x 28 tokens) and the ``small`` backbone (384 dims x 12 blocks) with the bundled decoder; random
    weights (the cost does not depend on them).
    ``extra_info['over_bundled']``: the ratio of mean times (run ``bundled`` first). Warm triage of the
    bundled slide is about all nuclei forward (issue 27, session 13: 96 %), so this ratio is about what
    the model would do to triage time."""
    import dataclasses

    import torch

    from cellvit_optimus.heads.backbone import build_backbone, get_preset
    from cellvit_optimus.heads.unetr import SMALL_DECODER, UNETRHead, fuse_for_inference

    preset = get_preset("small" if arch == "small_backbone" else "tiny")
    if arch == "patch8":
        preset = dataclasses.replace(preset, name="tiny-patch8", patch_size=8)
    decoder = tuple(2 * c for c in SMALL_DECODER) if arch == "decoder_x2" else SMALL_DECODER
    backbone = build_backbone(preset, seed=0)
    head = fuse_for_inference(UNETRHead(preset.embed_dim, 4, patch_size=preset.patch_size,
                                        tile_size=preset.tile_size, decoder_channels=decoder))
    n = smoke(benchmark, 32, 4)
    x = torch.randn(n, 3, preset.tile_size, preset.tile_size).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode():
            for s in range(0, len(x), 4):
                _, tokens = backbone(x[s:s + 4], tokens=True)
                head(tokens, x[s:s + 4])

    if not benchmark.disabled:
        forward()  # warm-up outside the timing
    benchmark.pedantic(forward, rounds=3, warmup_rounds=0)
    benchmark.extra_info.update(arch=arch, decoder=list(decoder), patch_size=preset.patch_size)
    record_ratio(benchmark, _ARCH_MEANS, arch, record(benchmark, tiles=len(x)), "bundled", "over_bundled")


#: the commit whose bundled nuclei model (and its OOD / conformal states) the ``triage-model`` group
#: compares against: the model before issue 27's retraining
PREVIOUS_MODEL_COMMIT = "685c514"
_TRIAGE_MODEL_MEANS: dict[str, float] = {}


def _previous_model(tmp: os.PathLike[str]) -> dict[str, str] | None:
    """the previous bundled model and states, written from git history into ``tmp`` (None: no history)"""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = {}
    for name in ("default_nuclei.safetensors", "default_ood.npz", "default_nuclei_conformal.json"):
        r = subprocess.run(["git", "-C", str(repo), "show", f"{PREVIOUS_MODEL_COMMIT}:engine/data/{name}"],
                           capture_output=True)
        if r.returncode != 0:
            return None
        (Path(tmp) / name).write_bytes(r.stdout)
        out[name] = str(Path(tmp) / name)
    return out


@pytest.mark.benchmark(group="triage-model")
@pytest.mark.parametrize("model", ["previous", "bundled"])
def test_triage_warm_previous_vs_bundled_model(benchmark, tmp_path, model):
    """Warm triage of the bundled slide at the model's own resolution (Numba compiled, model loaded, a
    fresh output folder each round) with the previous bundled model and with today's, each with its own
    safety states: ``extra_info['bundled_over_previous']`` is the ratio of mean times (issue 27: <= 1.5)."""
    from cellvit_optimus.engine.triage.engine import Engine, TriageConfig
    from cellvit_optimus.safety import SafetyConfig

    if model == "previous":
        prev = _previous_model(tmp_path)
        if prev is None:
            pytest.skip(f"the previous model (git {PREVIOUS_MODEL_COMMIT}) is not in this checkout's history")
        engine = Engine(TriageConfig(safety=SafetyConfig(ood_state_path=prev["default_ood.npz"],
                                                         conformal_state_path=prev["default_nuclei_conformal.json"])),
                        nuclei_weights=prev["default_nuclei.safetensors"])
    else:
        engine = Engine(TriageConfig())
    once = _bundled_slide_runs(engine, tmp_path)
    res = benchmark.pedantic(once, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(model=model, nuclei=res.nuclei, tag=res.tag)
    record_ratio(benchmark, _TRIAGE_MODEL_MEANS, model, record(benchmark, tiles=res.tiles), "previous",
                 "bundled_over_previous")
