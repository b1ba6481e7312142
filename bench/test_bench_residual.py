"""FP32 residual or a pure FP16/BF16 residual (``gpu`` marker): accuracy against FP32 on real tiles, and
throughput, on H-optimus-0 (random init) with CUDA graphs, so one GPU run answers which to keep.

``BackboneRunner(residual="fp32")`` (the default) keeps the residual stream, norms and LayerScale in
fp32 under autocast: casts around every norm and LayerScale, at ViT-g size about as much memory traffic
per tile as the matmuls' own. ``residual="half"`` runs the whole model in the compute type. Each row
runs real H&E tiles (the CMU slide's tissue tiles at 0.5 um/px, repeated to the batch) and records:

* ``tiles_per_s`` and ``fraction_of_fp16_peak`` (graphs, batch :data:`BATCH`);
* ``emb_cos_min`` / ``emb_cos_mean``: cosine similarity of each tile's embedding with the FP32
  runner's (eager, no TF32); ``tokens_rel_err``: the largest relative L2 error over the token maps
  the nuclei head reads.

bench/gpu_check.py turns the rows into the decision (``decisions.residual`` in the results file): the
half residual is kept for a dtype when its embeddings stay within :data:`MIN_COS` and its token maps
within :data:`MAX_TOKENS_REL_ERR` of FP32 and it is at least :data:`MIN_SPEEDUP` times as fast.
"""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest

from benchutil import gpu_batches  # type: ignore[import-not-found]

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

#: one batch size: the largest of OPTIMUS_BENCH_GPU_BATCHES (the check's), 128 by default
BATCH = max(gpu_batches((128,)))
#: the decision's thresholds (also in bench/gpu_check.py, which applies them)
MIN_COS = 0.999
MAX_TOKENS_REL_ERR = 0.02
MIN_SPEEDUP = 1.05


@pytest.fixture(scope="module")
def real_tiles(slides_dir) -> np.ndarray:  # type: ignore[no-untyped-def]
    from cellvit_optimus.engine.wsi.slide import open_slide
    from cellvit_optimus.engine.wsi.tissue import tile_grid

    with open_slide(slides_dir / "cmu-1-small-region.svs") as s:
        coords = [tuple(map(int, c)) for c in tile_grid(s).coords]
        tiles = s.read_tiles(coords, 224, 0.5)
    return np.concatenate([tiles] * (BATCH // len(tiles) + 1))[:BATCH]


@pytest.fixture(scope="module")
def fp32_reference(hoptimus0_cpu, real_tiles):  # type: ignore[no-untyped-def]
    """the FP32 runner's outputs on the real tiles, on the host (eager, TF32 off)"""
    import torch

    from cellvit_optimus.engine.pipeline.runner import BackboneRunner

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        r = BackboneRunner("hoptimus0", device="cuda", dtype="fp32", use_cuda_graphs=False, batch_size=32,
                           backbone=copy.deepcopy(hoptimus0_cpu))
        out = r(real_tiles)
        ref = (out.embedding.cpu(), tuple(t.cpu() for t in out.tokens))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    del r, out
    gc.collect()
    torch.cuda.empty_cache()
    return ref


@pytest.mark.parametrize("residual", ["fp32", "half"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_hoptimus0_residual(  # type: ignore[no-untyped-def]
    benchmark, hoptimus0_cpu, real_tiles, fp32_reference, dtype, residual
):
    import torch

    from cellvit_optimus.engine.pipeline.runner import BackboneRunner
    from cellvit_optimus.heads import PRESETS
    from test_bench_backbone import _record  # type: ignore[import-not-found]

    benchmark.group = f"backbone-gpu-hoptimus0-residual-{dtype}-b{BATCH}"
    runner = BackboneRunner("hoptimus0", device="cuda", dtype=dtype, residual=residual, batch_size=BATCH,
                            capture_sizes=(BATCH,), backbone=copy.deepcopy(hoptimus0_cpu))
    runner.capture()
    out = runner(real_tiles)
    emb, toks = out.embedding.float().cpu(), tuple(t.float().cpu() for t in out.tokens)
    ref_emb, ref_toks = fp32_reference
    cos = torch.nn.functional.cosine_similarity(emb, ref_emb, dim=1)
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(toks, ref_toks, strict=True))
    finite = bool(torch.isfinite(emb).all()) and all(bool(torch.isfinite(t).all()) for t in toks)
    benchmark.pedantic(lambda: (runner(real_tiles), torch.cuda.synchronize()), rounds=10, warmup_rounds=2,
                       iterations=1)
    _record(benchmark, BATCH, PRESETS["hoptimus0"].flops_per_tile(), torch.cuda.get_device_name())
    weights = sum(p.numel() * p.element_size() for p in runner.backbone.parameters())
    benchmark.extra_info.update(dtype=dtype, residual=residual, finite=finite, tokens_rel_err=round(rel, 6),
                                emb_cos_min=round(float(cos.min()), 6),
                                emb_cos_mean=round(float(cos.mean()), 6), weight_gb=round(weights / 2**30, 3))
    runner.release_graphs()
    runner = out = None  # the 1.1 B-parameter copy goes before the next row's
    gc.collect()
    torch.cuda.empty_cache()
    assert finite, f"{dtype} residual={residual}: non-finite outputs"
