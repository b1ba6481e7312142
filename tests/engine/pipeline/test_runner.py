"""BackboneRunner: shapes, determinism, normalisation, token maps, validation, counters, OOM fallback.

CPU tests use the ``tiny`` preset (random init, seconds). GPU tests (marked ``gpu``, skipped without
CUDA) compare CUDA-graph replays with the eager path, check padding and the OOM fallback.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from cellvit_optimus.engine.errors import BackendUnavailableError, ConfigError
from cellvit_optimus.engine.pipeline.runner import (
    CAPTURE_SIZES,
    BackboneOutput,
    BackboneRunner,
    apply_precision,
    is_out_of_memory,
    next_capture_size,
)
from cellvit_optimus.heads import PRESETS, build_backbone

TINY = PRESETS["tiny"]


def make_tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def runner() -> BackboneRunner:
    return BackboneRunner("tiny", batch_size=4)


def test_output_shapes_and_dtypes(runner: BackboneRunner) -> None:
    out = runner(make_tiles(3))
    assert isinstance(out, BackboneOutput) and len(out) == 3
    assert out.embedding.shape == (3, 192) and out.embedding.dtype == torch.float32
    assert len(out.tokens) == 4
    assert all(t.shape == (3, 192, 16, 16) and t.dtype == torch.float32 for t in out.tokens)
    assert out.embedding.device.type == "cpu"


def test_deterministic_across_calls(runner: BackboneRunner) -> None:
    x = make_tiles(3, seed=1)
    a, b = runner(x), runner(x)
    assert torch.equal(a.embedding, b.embedding)
    assert all(torch.equal(s, t) for s, t in zip(a.tokens, b.tokens))


def test_same_weights_across_runners() -> None:
    x = make_tiles(2)
    a, b = BackboneRunner("tiny", seed=5)(x), BackboneRunner("tiny", seed=5)(x)
    assert torch.equal(a.embedding, b.embedding)


def test_chunking_matches_one_batch(runner: BackboneRunner) -> None:
    x = make_tiles(10, seed=2)
    before = runner.calls
    chunked = runner(x)  # batch_size 4 -> 4 + 4 + 2
    assert runner.calls - before == 3
    whole = BackboneRunner("tiny", batch_size=16)(x)
    torch.testing.assert_close(chunked.embedding, whole.embedding, rtol=1e-4, atol=1e-5)
    for s, t in zip(chunked.tokens, whole.tokens):
        torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-4)


def test_normalisation_matches_manual_computation(runner: BackboneRunner) -> None:
    x = make_tiles(2, seed=3)
    mean, std = np.array(TINY.mean), np.array(TINY.std)
    manual = ((x.astype(np.float64) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    got = runner.preprocess(x)
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), manual, rtol=1e-5, atol=1e-5)
    # and the runner's embedding is timm's forward on that input
    with torch.inference_mode():
        ref = runner.backbone.model(torch.from_numpy(manual).float())
    torch.testing.assert_close(runner(x).embedding, ref, rtol=1e-4, atol=1e-6)


def test_torch_input_equals_numpy_input(runner: BackboneRunner) -> None:
    x = make_tiles(2, seed=4)
    assert torch.equal(runner(x).embedding, runner(torch.from_numpy(x)).embedding)
    strided = np.stack([x, x], axis=1)[:, 0]  # same tiles, not C-contiguous
    assert not strided.flags.c_contiguous
    assert torch.equal(runner(x).embedding, runner(strided).embedding)


def test_embeddings_only_skip_token_maps(runner: BackboneRunner) -> None:
    x = make_tiles(3, seed=5)
    full, lean = runner(x), runner(x, tokens=False)
    assert lean.tokens == ()
    torch.testing.assert_close(lean.embedding, full.embedding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runner.embed(x), full.embedding, rtol=1e-5, atol=1e-6)
    assert BackboneRunner("tiny", tokens=False)(x).tokens == ()


def test_token_maps_follow_blocks() -> None:
    x = make_tiles(2, seed=6)
    r = BackboneRunner("tiny", blocks=(2, 4))
    assert r.blocks == (2, 4)
    out = r(x)
    assert len(out.tokens) == 2 and all(t.shape == (2, 192, 16, 16) for t in out.tokens)
    ref = BackboneRunner("tiny")(x)  # default blocks 1..4: blocks 2 and 4 are its 2nd and 4th maps
    torch.testing.assert_close(out.tokens[0], ref.tokens[1])
    torch.testing.assert_close(out.tokens[1], ref.tokens[3])


@pytest.mark.parametrize("blocks", [(0,), (5,), (3, 1), ()])
def test_blocks_validation(blocks: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match=r"blocks=.*1-based block indices in 1\.\.4"):
        BackboneRunner("tiny", blocks=blocks)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 224, 224, 3), dtype=np.float32),
        np.zeros((2, 3, 224, 224), dtype=np.uint8),
        np.zeros((224, 224, 3), dtype=np.uint8),
        np.zeros((2, 256, 256, 3), dtype=np.uint8),
        torch.zeros((2, 224, 224, 4), dtype=torch.uint8),
    ],
)
def test_tile_validation(runner: BackboneRunner, bad: np.ndarray) -> None:
    with pytest.raises(ConfigError, match=r"tiles: expected uint8 \(B, 224, 224, 3\) for preset 'tiny', got"):
        runner(bad)
    with pytest.raises(ConfigError, match="expected a numpy array or torch tensor, got list"):
        runner([[0]])  # type: ignore[arg-type]


def test_constructor_validation() -> None:
    with pytest.raises(ConfigError, match="dtype='fp16' on the CPU"):
        BackboneRunner("tiny", dtype="fp16")
    with pytest.raises(ConfigError, match="dtype='fp8': must be one of fp16, bf16, fp32"):
        BackboneRunner("tiny", dtype="fp8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size=0"):
        BackboneRunner("tiny", batch_size=0)
    with pytest.raises(ConfigError, match="device='tpu'"):
        BackboneRunner("tiny", device="tpu")
    with pytest.raises(ConfigError, match="unknown backbone preset"):
        BackboneRunner("nope")
    with pytest.raises(ConfigError, match="stain_norm=3"):
        BackboneRunner("tiny", stain_norm=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="backbone= is a built 'tiny' backbone"):
        BackboneRunner("small", backbone=build_backbone("tiny"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(BackendUnavailableError, match="device='cuda': CUDA is not available"):
        BackboneRunner("tiny", device="cuda")


def test_counters_and_empty_batch() -> None:
    r = BackboneRunner("tiny", batch_size=2)
    assert (r.calls, r.tiles_processed) == (0, 0)
    out = r(make_tiles(0))
    assert out.embedding.shape == (0, 192) and all(t.shape == (0, 192, 16, 16) for t in out.tokens)
    assert r.calls == 0
    r(make_tiles(5))
    assert (r.calls, r.tiles_processed, r.stats.eager_calls, r.stats.graph_replays) == (3, 5, 3, 0)
    assert r.stats.padded_tiles == 0 and r.stats.padding_fraction == 0.0
    r.reset_stats()
    assert r.calls == 0


def test_bf16_on_cpu_is_close_to_fp32() -> None:
    backbone = build_backbone("tiny", seed=7)
    with (
        torch.no_grad()
    ):  # random init leaves CLS ~1e-6; give it a real scale so the comparison means something
        backbone.model.cls_token.normal_()
    x = make_tiles(2, seed=7)
    ref = BackboneRunner("tiny", backbone=build_backbone("tiny", seed=7))  # fresh, untouched copy below
    ref.backbone.model.cls_token.data.copy_(backbone.model.cls_token)
    r = BackboneRunner("tiny", dtype="bf16", backbone=backbone)
    blk = r.backbone.model.blocks[0]
    assert blk.attn.qkv.weight.dtype == torch.bfloat16 and blk.norm1.weight.dtype == torch.float32
    assert blk.ls1.gamma.dtype == torch.float32 and r.backbone.model.pos_embed.dtype == torch.float32
    ptr = blk.attn.qkv.weight.data_ptr()
    assert apply_precision(r.backbone, torch.bfloat16) is r.backbone
    assert blk.attn.qkv.weight.data_ptr() == ptr  # already cast: re-applying converts nothing
    out, exp = r(x), ref(x)
    assert out.embedding.dtype == torch.float32 and out.tokens[0].dtype == torch.bfloat16
    torch.testing.assert_close(out.embedding, exp.embedding, rtol=0.05, atol=0.05)
    for s, t in zip(out.tokens, exp.tokens):
        torch.testing.assert_close(s.float(), t, rtol=0.05, atol=0.05)


def _real_tiles(slides_dir: Path, n: int = 16) -> np.ndarray:
    from cellvit_optimus.engine.wsi.slide import open_slide
    from cellvit_optimus.engine.wsi.tissue import tile_grid

    with open_slide(slides_dir / "cmu-1-small-region.svs") as s:
        coords = [tuple(map(int, c)) for c in tile_grid(s).coords[:n]]
        return s.read_tiles(coords, 224, 0.5)


def test_half_residual_is_all_in_the_compute_type_and_close_on_real_tiles(slides_dir: Path) -> None:
    """``residual="half"``: no fp32 tensor left, no autocast; bf16 (the CPU's half type) against fp32 on
    real H&E tiles. Tolerance: cosine >= 0.99 per tile for the random-init tiny model (bf16 keeps 8
    bits of mantissa; the GPU check measures fp16/bf16 on H-optimus-0)."""
    x = _real_tiles(slides_dir)
    ref = BackboneRunner("tiny", backbone=_scaled())(x)
    half = BackboneRunner("tiny", dtype="bf16", residual="half", backbone=_scaled())
    m = half.backbone.model
    assert {t.dtype for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()} == {torch.bfloat16}
    assert half.residual == "half" and "residual='half'" in repr(half)
    out = half(x)
    assert out.embedding.dtype == torch.float32 and out.tokens[0].dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(out.embedding, ref.embedding, dim=1)
    assert cos.min() >= 0.99, cos
    mixed = BackboneRunner("tiny", dtype="bf16", backbone=_scaled())(x)  # the fp32-residual default
    cos_mixed = torch.nn.functional.cosine_similarity(mixed.embedding, ref.embedding, dim=1)
    assert cos_mixed.min() >= 0.99 and not torch.equal(mixed.embedding, out.embedding)


def test_runners_on_a_device_share_one_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    from cellvit_optimus.engine.pipeline import runner as runner_module

    made: list[object] = []
    monkeypatch.setattr(runner_module, "_RUNNER_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: made.append(device) or object())
    a = runner_module.runner_stream(torch.device("cuda", 0))
    assert runner_module.runner_stream(torch.device("cuda", 0)) is a and len(made) == 1
    assert runner_module.runner_stream(torch.device("cuda", 1)) is not a and len(made) == 2


def test_residual_validation() -> None:
    with pytest.raises(ConfigError, match="residual='bf16'"):
        BackboneRunner("tiny", dtype="bf16", residual="bf16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="residual='half' needs dtype"):
        BackboneRunner("tiny", residual="half")
    with pytest.raises(ConfigError, match="residual='x'"):
        apply_precision(build_backbone("tiny"), torch.bfloat16, "x")  # type: ignore[arg-type]


def test_stage_times_count_every_forward_on_the_cpu() -> None:
    r = BackboneRunner("tiny", batch_size=4, backbone=_scaled())
    out = r(make_tiles(10, seed=3))
    assert out.spans == ()  # device spans exist on CUDA only
    counts, totals = r.stage_times.counts(), r.stage_times.totals()
    assert counts == {"h2d": 3, "backbone": 3}  # 4 + 4 + 2 tiles
    assert totals["backbone_s"] > 0 and set(totals) == {"h2d_s", "backbone_s"}
    r.stage_times.reset()
    assert r.stage_times.totals() == {}


def test_stain_norm_hook(runner: BackboneRunner) -> None:
    seen = []

    def hook(x: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(x.shape), x.dtype, float(x.min()), float(x.max())))
        return x

    x = make_tiles(2, seed=8)
    r = BackboneRunner("tiny", stain_norm=hook, backbone=runner.backbone)
    torch.testing.assert_close(r(x).embedding, runner(x).embedding)
    shape, dtype, lo, hi = seen[0]
    assert shape == (2, 3, 224, 224) and dtype == torch.float32 and 0.0 <= lo and hi <= 1.0
    darker = BackboneRunner("tiny", stain_norm=lambda t: t * 0.5, backbone=runner.backbone)
    assert not torch.equal(darker(x).embedding, runner(x).embedding)
    broken = BackboneRunner("tiny", stain_norm=lambda t: t[:, :1], backbone=runner.backbone)
    with pytest.raises(
        ConfigError, match=r"stain_norm returned \(2, 1, 224, 224\), expected a tensor of shape"
    ):
        broken(x)


def test_oom_drops_to_smaller_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    r = BackboneRunner("tiny", batch_size=8)
    x = make_tiles(6, seed=9)
    expected = r(x)
    forward = r._forward

    def small_only(t: torch.Tensor, tokens: bool):  # type: ignore[no-untyped-def]
        if t.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return forward(t, tokens)

    monkeypatch.setattr(r, "_forward", small_only)
    r.reset_stats()
    out = r(x)
    assert r.batch_size == 2 and r.stats.oom_fallbacks == 2  # 8 -> 4 -> 2
    assert r.calls == 3
    torch.testing.assert_close(out.embedding, expected.embedding, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(r, "_forward", lambda t, tokens: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):  # nothing smaller than 1 to fall back to
        BackboneRunner.__call__(r, make_tiles(1))


def test_capture_sizes_helpers() -> None:
    assert list(CAPTURE_SIZES) == sorted(set(CAPTURE_SIZES))
    assert next_capture_size(1) == 1 and next_capture_size(5) == 8 and next_capture_size(33) == 48
    assert next_capture_size(CAPTURE_SIZES[-1] + 1) is None
    r = BackboneRunner("tiny", batch_size=40)
    assert r.capture_sizes == (1, 2, 4, 8, 16, 32, 40)
    assert not r.use_cuda_graphs  # graphs are CUDA-only
    r.capture()  # a no-op on the CPU
    assert r.captured_graphs == ()
    assert BackboneRunner("tiny", batch_size=64, capture_sizes=(64,)).capture_sizes == (64,)
    assert BackboneRunner("tiny", batch_size=20, capture_sizes=(8, 32)).capture_sizes == (8, 20)
    with pytest.raises(ConfigError, match=r"capture_sizes=\(0,\)"):
        BackboneRunner("tiny", capture_sizes=(0,))


def test_weights_id(runner: BackboneRunner) -> None:
    assert runner.weights_id == "random:tiny:seed=0"
    assert "BackboneRunner(preset='tiny', device='cpu', dtype='fp32'" in repr(runner)


# -- GPU ---------------------------------------------------------------------------------------------------


def _scaled(backbone_seed: int = 11):  # type: ignore[no-untyped-def]
    b = build_backbone("tiny", seed=backbone_seed)
    with torch.no_grad():
        b.model.cls_token.normal_(generator=torch.Generator().manual_seed(backbone_seed))
    return b


@pytest.mark.gpu
def test_graph_matches_eager_fp16() -> None:
    x = make_tiles(16, seed=10)
    graph = BackboneRunner("tiny", device="cuda", dtype="fp16", batch_size=16, backbone=_scaled())
    eager = BackboneRunner(
        "tiny", device="cuda", dtype="fp16", batch_size=16, use_cuda_graphs=False, backbone=_scaled()
    )
    ref = BackboneRunner("tiny", dtype="fp32", backbone=_scaled())(x)
    g, e = graph(x), eager(x)
    assert graph.stats.graph_replays == 1 and eager.stats.eager_calls == 1
    assert (16, True) in graph.captured_graphs
    torch.testing.assert_close(g.embedding, e.embedding, rtol=1e-2, atol=1e-2)
    for s, t in zip(g.tokens, e.tokens):
        assert s.dtype == torch.float16
        torch.testing.assert_close(s, t, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g.embedding.cpu(), ref.embedding, rtol=2e-2, atol=2e-2)
    for s, t in zip(g.tokens, ref.tokens):
        torch.testing.assert_close(s.float().cpu(), t, rtol=2e-2, atol=2e-2)
    again = graph(x)  # replays are deterministic and the outputs handed out are copies
    assert torch.equal(again.embedding, g.embedding)


@pytest.mark.gpu
def test_partial_batch_is_padded() -> None:
    x = make_tiles(5, seed=12)
    graph = BackboneRunner("tiny", device="cuda", batch_size=16, backbone=_scaled())
    eager = BackboneRunner("tiny", device="cuda", batch_size=16, use_cuda_graphs=False, backbone=_scaled())
    out = graph(x)
    assert out.embedding.shape == (5, 192) and all(t.shape[0] == 5 for t in out.tokens)
    assert graph.stats.padded_tiles == 3 and graph.stats.graph_replays == 1  # 5 -> captured size 8
    assert graph.stats.padding_fraction == pytest.approx(3 / 8)
    torch.testing.assert_close(out.embedding, eager(x).embedding, rtol=1e-2, atol=1e-2)
    lean = graph(x, tokens=False)  # the embedding-only graphs are captured separately
    assert lean.tokens == () and (8, False) in graph.captured_graphs
    torch.testing.assert_close(lean.embedding, out.embedding, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_oom_fallback_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    r = BackboneRunner("tiny", device="cuda", batch_size=16, backbone=_scaled())
    forward = r._forward

    def small_only(t: torch.Tensor, tokens: bool):  # type: ignore[no-untyped-def]
        if t.shape[0] > 4:  # raised in the warm-up before capture, as a real OOM would be
            raise torch.cuda.OutOfMemoryError("simulated")
        return forward(t, tokens)

    monkeypatch.setattr(r, "_forward", small_only)
    out = r(make_tiles(10, seed=13))
    assert out.embedding.shape == (10, 192)
    assert r.batch_size == 4 and r.stats.oom_fallbacks == 2
    assert max(size for size, _ in r.captured_graphs) == 4


def _settle() -> None:
    """what earlier tests left goes: garbage, cached blocks, cuBLAS workspaces (per stream, kept by
    empty_cache), so that a memory check measures this test's runner and not the test order"""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_batch_size_fitted_to_budget() -> None:
    _settle()
    base = torch.cuda.memory_allocated()
    r = BackboneRunner("small", device="cuda", vram_budget_gb=1.5)
    assert r.probe is not None and r.batch_size in CAPTURE_SIZES
    assert r.probe["predicted_peak_bytes"] <= 1.5 * 2**30
    torch.cuda.reset_peak_memory_stats()
    r(make_tiles(r.batch_size))
    assert torch.cuda.max_memory_allocated() - base <= 1.5 * 2**30


@pytest.mark.gpu
def test_release_returns_graph_and_workspace_memory() -> None:
    """after release_graphs only the weights stay: graph pool, static buffers and the cuBLAS workspace
    (32 MiB on Hopper, which empty_cache alone keeps) are returned"""
    import gc

    _settle()
    base = torch.cuda.memory_allocated()
    r = BackboneRunner("tiny", device="cuda", batch_size=64, backbone=_scaled())
    other = BackboneRunner("tiny", device="cuda", batch_size=8, backbone=_scaled())
    assert r._stream is other._stream  # one stream (one workspace) for every runner on the device
    r(make_tiles(64, seed=31))
    assert len(r.captured_graphs) == 8  # 1, 2, 4, 8, 16, 32, 48, 64
    params = [*r.backbone.parameters(), *other.backbone.parameters()]
    weights = sum(t.numel() * t.element_size() for t in params)
    r.release_graphs()
    gc.collect()
    left = torch.cuda.memory_allocated() - base - weights
    assert left <= 1 * 2**20, f"{left / 2**20:.1f} MiB left after release_graphs"


@pytest.mark.gpu
def test_cuda_inputs_and_pinned_path_agree() -> None:
    r = BackboneRunner("tiny", device="cuda", batch_size=8, backbone=_scaled())
    x = make_tiles(4, seed=14)
    a = r(x)
    b = r(torch.from_numpy(x).cuda())
    assert a.embedding.device.type == "cuda"
    assert torch.equal(a.embedding, b.embedding)


# -- the graph dispatcher on the CPU, with torch.cuda's graph API faked --------------------------------------


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: 'replay' re-runs the captured forward into the static outputs."""

    capturing: _FakeGraph | None = None

    def __init__(self) -> None:
        self.call: tuple | None = None  # (forward, static input, tokens, static outputs)

    def replay(self) -> None:
        forward, static_in, tokens, (emb, toks) = self.call  # type: ignore[misc]
        new_emb, new_toks = forward(static_in, tokens)
        emb.copy_(new_emb)
        for dst, src in zip(toks, new_toks, strict=True):
            dst.copy_(src)


@pytest.fixture
def fake_graph_runner(monkeypatch: pytest.MonkeyPatch) -> BackboneRunner:
    import contextlib

    class FakeStream:
        def wait_stream(self, other: object) -> None:
            pass

    @contextlib.contextmanager
    def fake_graph(  # type: ignore[no-untyped-def]
        graph: _FakeGraph, pool: object = None, stream: object = None, capture_error_mode: str = "global"
    ):
        _FakeGraph.capturing = graph
        graph.stream = stream  # type: ignore[attr-defined]
        try:
            yield
        except torch.OutOfMemoryError:
            # torch.cuda.graph's exit calls capture_end(), which fails after an error during capture:
            # the caller sees this RuntimeError, with the OOM only as its __context__
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        finally:
            _FakeGraph.capturing = None

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)

    r = BackboneRunner("tiny", batch_size=8)
    r.use_cuda_graphs = True  # what a CUDA device would have set
    forward = r._forward
    r.captures = []  # type: ignore[attr-defined]

    def recording_forward(x: torch.Tensor, tokens: bool):  # type: ignore[no-untyped-def]
        out = forward(x, tokens)
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.call = (forward, x, tokens, out)
            r.captures.append((x.shape[0], tokens))  # type: ignore[attr-defined]
        return out

    monkeypatch.setattr(r, "_forward", recording_forward)
    return r


def test_dispatcher_pads_replays_and_slices(fake_graph_runner: BackboneRunner) -> None:
    r = fake_graph_runner
    eager = BackboneRunner("tiny", batch_size=8, backbone=r.backbone)
    x = make_tiles(5, seed=20)
    out = r(x)
    assert r.captures == [(8, True), (4, True), (2, True), (1, True)]  # type: ignore[attr-defined]
    assert r.captured_graphs == ((1, True), (2, True), (4, True), (8, True))
    assert (r.stats.graph_replays, r.stats.eager_calls, r.stats.padded_tiles) == (1, 0, 3)
    assert r.stats.graphs_captured == 4
    ref = eager(x)
    assert out.embedding.shape == (5, 192) and all(t.shape == (5, 192, 16, 16) for t in out.tokens)
    torch.testing.assert_close(out.embedding, ref.embedding, rtol=1e-4, atol=1e-5)
    for s, t in zip(out.tokens, ref.tokens, strict=True):
        torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-4)
    # handed-out outputs are copies: the next replay does not overwrite them
    kept = out.embedding.clone()
    r(make_tiles(5, seed=21))
    assert torch.equal(out.embedding, kept)
    # 10 tiles at batch size 8: a full graph and a 2-tile graph, no padding
    r.reset_stats()
    r(make_tiles(10, seed=22))
    assert (r.stats.graph_replays, r.stats.padded_tiles, r.stats.tiles) == (2, 0, 10)
    # embeddings only: captured separately, on first use
    lean = r(x, tokens=False)
    assert lean.tokens == () and (8, False) in r.captured_graphs
    torch.testing.assert_close(lean.embedding, ref.embedding, rtol=1e-4, atol=1e-5)
    r.release_graphs()
    assert r.captured_graphs == ()


def test_one_stream_for_warm_ups_captures_and_replays_and_warm_ups_first(
    fake_graph_runner: BackboneRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """each stream has its own cuBLAS workspace (32 MiB on Hopper, kept after empty_cache): a runner
    must use one stream for everything, create none while capturing, and warm every size up before
    the first capture so no warm-up's activations sit beside the graphs' pool"""
    import contextlib

    r = fake_graph_runner
    own = object()
    r._stream = own  # what a CUDA runner creates once, in __init__
    current: list[object] = [None]
    created: list[object] = []
    calls: list[tuple[int, bool, object]] = []  # (batch, capturing, stream current at the call)

    @contextlib.contextmanager
    def on(stream):  # type: ignore[no-untyped-def]
        before, current[0] = current[0], stream
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: created.append(device) or object())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0] or "caller")
    events: list[object] = []

    class Event:  # the runner times h2d and backbone with events on its stream
        def __init__(self, enable_timing: bool = False) -> None:
            pass

        def record(self, stream: object) -> None:
            events.append(stream)

        def query(self) -> bool:
            return True

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: object) -> float:
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    recording = r._forward

    def watched(x: torch.Tensor, tokens: bool):  # type: ignore[no-untyped-def]
        calls.append((x.shape[0], _FakeGraph.capturing is not None, current[0]))
        return recording(x, tokens)

    r._forward = watched  # type: ignore[method-assign]
    r._on_stream = lambda tiles: on(own)  # type: ignore[method-assign]  (its CUDA-only hand-off aside)
    r(make_tiles(5, seed=30))
    assert created == []  # no stream (and no workspace) per captured size
    assert events and all(e is own for e in events)  # stage events on the runner's stream
    assert all(stream is own for _, _, stream in calls), calls
    capturing = [c for _, c, _ in calls]
    assert capturing == [False] * 8 + [True] * 4 + [False] * 0, calls  # 2 warm-ups x 4 sizes, then captures
    assert [b for b, c, _ in calls if not c] == [8, 8, 4, 4, 2, 2, 1, 1]
    graphs = r._dispatch._graphs
    assert all(g.graph.stream is own for g in graphs.values())  # type: ignore[attr-defined]
    shared = r._dispatch._input
    assert shared is not None and shared.shape[0] == 8
    assert {g.static_in.data_ptr() for g in graphs.values()} == {shared.data_ptr()}  # one input buffer


def test_oom_inside_graph_capture_drops_to_a_smaller_batch(fake_graph_runner: BackboneRunner) -> None:
    r = fake_graph_runner
    eager = BackboneRunner("tiny", batch_size=8, backbone=r.backbone)
    recording = r._forward

    def oom_when_capturing_big(x: torch.Tensor, tokens: bool):  # type: ignore[no-untyped-def]
        if _FakeGraph.capturing is not None and x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return recording(x, tokens)

    r._forward = oom_when_capturing_big  # type: ignore[method-assign]
    x = make_tiles(5, seed=23)
    out = r(x)
    assert r.batch_size == 2 and r.stats.oom_fallbacks == 2  # 8 -> 4 -> 2
    assert r.captured_graphs == ((1, True), (2, True))
    assert (r.stats.graph_replays, r.stats.tiles) == (3, 5)  # 2 + 2 + 1
    torch.testing.assert_close(out.embedding, eager(x).embedding, rtol=1e-4, atol=1e-5)


def test_a_capture_that_fails_for_another_reason_runs_eagerly(fake_graph_runner: BackboneRunner) -> None:
    r = fake_graph_runner
    eager = BackboneRunner("tiny", batch_size=8, backbone=r.backbone)
    recording = r._forward

    def refuse_capture(x: torch.Tensor, tokens: bool):  # type: ignore[no-untyped-def]
        if _FakeGraph.capturing is not None:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return recording(x, tokens)

    r._forward = refuse_capture  # type: ignore[method-assign]
    x = make_tiles(5, seed=24)
    out = r(x)
    assert not r.use_cuda_graphs and r.captured_graphs == ()
    assert (r.stats.capture_failures, r.stats.eager_calls, r.stats.oom_fallbacks, r.batch_size) == (1, 1, 0, 8)
    torch.testing.assert_close(out.embedding, eager(x).embedding, rtol=1e-4, atol=1e-5)


def test_is_out_of_memory_follows_the_exception_chain() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as exc:
        assert is_out_of_memory(exc)
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    loop = RuntimeError("a")
    loop.__context__ = RuntimeError("b")
    loop.__context__.__context__ = loop
    assert not is_out_of_memory(loop)


# -- GPU: the risks of a first run on real hardware --------------------------------------------------------


@pytest.mark.gpu
def test_real_oom_during_graph_capture_falls_back() -> None:
    """a memory cap too small for the 64-tile graph (its warm-up or its capture, whichever fails first)
    but not for the smaller ones: the runner must shrink, not fail"""
    tiles = make_tiles(64, seed=25)
    ref = BackboneRunner("tiny", device="cuda", batch_size=64, use_cuda_graphs=False, backbone=_scaled())
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    expected = ref(tiles)
    eager_64 = torch.cuda.max_memory_allocated() - base
    del ref
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    r = BackboneRunner("tiny", device="cuda", batch_size=64, backbone=_scaled())
    try:
        # room for the weights and about a third of a 64-tile forward: 64 cannot be captured, 16 can
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + eager_64 / 3) / total)
        out = r(tiles)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert r.stats.oom_fallbacks >= 1 and r.batch_size < 64, r.stats
    torch.testing.assert_close(out.embedding, expected.embedding, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_batch_fit_counts_reserved_memory() -> None:
    """the device pays for what the caching allocator reserves, graphs and workspaces included"""
    budget = 1.5 * 2**30
    _settle()
    base = torch.cuda.memory_reserved()
    r = BackboneRunner("small", device="cuda", vram_budget_gb=1.5)
    assert r.probe is not None and len(r.probe["probe_reserved_bytes"]) == 2
    assert r.probe["fixed_bytes"] >= r.probe["probe_reserved_bytes"][0] - 4 * r.probe["per_tile_bytes"]
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # captures every graph, then replays
        r(make_tiles(r.batch_size))
    r(make_tiles(3))
    assert torch.cuda.max_memory_reserved() - base <= budget, (torch.cuda.max_memory_reserved(), r.probe)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["small", "tiny"])
def test_fp16_token_maps_are_finite(preset: str) -> None:
    """raw block outputs are stored in fp16: any value past 65504 would become inf"""
    r = BackboneRunner(preset, device="cuda", dtype="fp16", batch_size=8)
    out = r(make_tiles(8, seed=26))
    assert torch.isfinite(out.embedding).all()
    for t in out.tokens:
        assert t.dtype == torch.float16 and torch.isfinite(t).all(), float(t.float().abs().max())
