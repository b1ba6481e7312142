"""The backbone runner: uint8 tiles in, tile embeddings and token maps out, as fast as the device allows.

Sits between the tile scheduler (which hands over ``(B, 224, 224, 3)`` uint8 batches) and the heads
and embedding cache. :class:`BackboneRunner` moves tiles to the device (pinned memory, non-blocking
copies on CUDA), normalises them there, and runs the frozen backbone from
:mod:`cellvit_optimus.heads.backbone` under ``torch.inference_mode``.

Precision: in ``fp16``/``bf16`` mode the matmul weights (every ``Linear`` and the patch ``Conv2d``) are
stored in the half type. With ``residual="fp32"`` (the default) the rest (norms, LayerScale, tokens,
position embedding) stays fp32 and the forward runs under autocast: half-precision matmuls at half the
weight memory (2.3 GB instead of 4.5 GB for H-optimus-0), the residual stream and norms in fp32, exactly
as autocast over an fp32 model keeps them, at the price of casts around every norm and LayerScale (at
ViT-g size about as much memory traffic per tile as the matmuls' own). ``residual="half"`` stores and
runs everything in the half type, without autocast; the GPU check (bench/test_bench_residual.py)
measures both against fp32 on real tiles, accuracy and tiles/s.

On CUDA the runner works on a stream of its own (:func:`runner_stream`, one per device): the
host-to-device copy, the probe, the warm-ups, the graph captures and every forward run there, so one
cuBLAS workspace serves them all (each stream has its own, 32 MiB on Hopper, kept until
:meth:`BackboneRunner.release_graphs`), and the caller's stream only waits for the work of its own
call. The forward is captured in CUDA graphs at the batch sizes in
:data:`CAPTURE_SIZES` (vLLM's scheme): a batch is padded up to the next captured size, copied into the
graphs' shared static input, the graph is replayed and the outputs sliced. Every size is warmed up before
the first capture, so no warm-up's activations sit beside the graphs' memory pool. The batch size comes
from a VRAM budget, fitted from the peak memory of two probe batches run on the runner's stream (its
workspace included) plus the captured graphs' outputs; a CUDA out-of-memory error drops to the next
smaller size instead of failing. Device time per stage (``h2d``, ``backbone``) is measured with CUDA
events (:attr:`BackboneRunner.stage_times`). The CPU path has the same API and runs eagerly in fp32 or
bf16. Nothing here needs CUDA to import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from cellvit_optimus.heads.backbone import Backbone, BackbonePreset, build_backbone, get_preset
from torch import nn

from cellvit_optimus.engine.errors import BackendUnavailableError, ConfigError
from cellvit_optimus.engine.settings import BACKBONE_CPU_BATCH
from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.pipeline.timing import DeviceSpan, StageTimes

__all__ = (
    "CAPTURE_SIZES",
    "DEFAULT_CPU_BATCH_SIZE",
    "PROBE_SIZES",
    "RESIDUALS",
    "BackboneOutput",
    "BackboneRunner",
    "RunnerStats",
    "apply_precision",
    "is_out_of_memory",
    "next_capture_size",
    "runner_stream",
)

logger = logging.getLogger(__name__)

# -- tuning constants: all of them, in one place --------------------------------------------------------
#: batch sizes captured as CUDA graphs (those up to the runner's batch size); a batch is padded up to the
#: next one. Dense at the small end, where slide remainders land, sparse at the large end.
CAPTURE_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
#: eager forwards run before capturing each graph (cuBLAS/cuDNN workspaces and autotuning settle)
WARMUP_ITERS = 2
#: the two batch sizes whose peak memory fits peak(b) = fixed + per_tile * b
PROBE_SIZES: tuple[int, int] = (4, 8)
#: fraction of the VRAM budget (and of the device's memory) the fitted peak may use
BUDGET_HEADROOM = 0.9
#: batch size of a bare backbone (feature extraction) on the CPU when none is given (engine.settings)
DEFAULT_CPU_BATCH_SIZE = BACKBONE_CPU_BATCH
#: memory the probe cannot see, added to the fitted peak when graphs are captured: the graph pool's
#: segment rounding (the probe runs on the runner's own stream, so its cuBLAS workspace is counted)
GRAPH_OVERHEAD_BYTES = 64 * 2**20

DType = Literal["fp16", "bf16", "fp32"]
#: where the residual stream, norms and LayerScale live in fp16/bf16 mode: "fp32" (autocast, casts
#: around them) or "half" (everything in the compute type)
Residual = Literal["fp32", "half"]
RESIDUALS: tuple[str, ...] = ("fp32", "half")
_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
Tiles = np.ndarray | torch.Tensor
StainNorm = Callable[[torch.Tensor], torch.Tensor]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised while handling, a CUDA out-of-memory error.

    An OOM inside CUDA-graph capture does not surface as ``torch.OutOfMemoryError``: leaving
    ``torch.cuda.graph`` calls ``capture_end()``, which fails with a ``RuntimeError`` ("operation failed
    due to a previous error during capture") whose ``__context__`` is the OOM.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # a short walk: chains are a few links long and may, in principle, loop
        if seen is None:
            return False
        if isinstance(seen, torch.OutOfMemoryError) or "out of memory" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_RUNNER_STREAMS: dict[torch.device, Any] = {}
_RUNNER_STREAMS_LOCK = threading.Lock()


def runner_stream(device: torch.device) -> torch.cuda.Stream:
    """The one CUDA stream every runner on ``device`` works on.

    cuBLAS keeps a workspace per (handle, stream), 32 MiB on Hopper, allocated through the caching
    allocator and kept after ``empty_cache``. One stream per device, made once and shared, keeps that at
    one workspace however many runners a process makes (tests and benchmarks make dozens; torch's pool
    would hand them up to 32 different streams). Runners on one device serialise there, which they would
    on the GPU anyway."""
    with _RUNNER_STREAMS_LOCK:
        if device not in _RUNNER_STREAMS:
            _RUNNER_STREAMS[device] = torch.cuda.Stream(device)
        return _RUNNER_STREAMS[device]


def next_capture_size(n: int, sizes: Sequence[int] = CAPTURE_SIZES) -> int | None:
    """The smallest captured size that holds ``n`` tiles, or None when ``n`` exceeds them all."""
    for s in sizes:
        if s >= n:
            return s
    return None


_M = TypeVar("_M", bound=nn.Module)


def apply_precision(model: _M, compute_dtype: torch.dtype, residual: Residual = "fp32") -> _M:
    """Store matmul weights (Linear, Conv2d) in ``compute_dtype`` and everything else in fp32 (or, with
    ``residual="half"``, everything in ``compute_dtype``), in place.

    Only tensors not already in their target dtype are converted, so re-applying it to a shared,
    already cast model on the GPU allocates nothing.
    """
    if residual not in RESIDUALS:
        raise ConfigError(f"residual={residual!r}: must be one of {', '.join(RESIDUALS)}")
    for m in model.modules():
        if residual == "half":
            target = compute_dtype
        else:
            target = compute_dtype if isinstance(m, (nn.Linear, nn.Conv2d)) else torch.float32
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if any(t.is_floating_point() and t.dtype != target for t in own):
            m._apply(lambda t, target=target: t.to(target) if t.is_floating_point() else t, recurse=False)
    return model


@dataclass
class BackboneOutput:
    """What one runner call returns, on the runner's device.

    ``embedding``: ``(B, D)`` float32 tile embeddings (CLS token after the final norm).
    ``tokens``: one ``(B, D, g, g)`` patch-token map per configured block (g = 16 for 224/14), float32 in
    fp32 mode and the half type otherwise; empty when token maps were not asked for.
    ``spans``: the call's device-timed stages on CUDA (``h2d``, ``backbone``; read them where waiting
    for the work costs nothing, e.g. after the outputs were copied to the host), empty on the CPU.
    """

    embedding: torch.Tensor
    tokens: tuple[torch.Tensor, ...]
    spans: tuple[DeviceSpan, ...] = ()

    def __len__(self) -> int:
        return int(self.embedding.shape[0])


@dataclass
class RunnerStats:
    """Counters of one runner. Probe, warm-up and capture forwards are not counted."""

    #: backbone forwards (eager calls plus graph replays)
    calls: int = 0
    #: real tiles that went through the backbone
    tiles: int = 0
    #: padding rows computed and thrown away to fit captured sizes
    padded_tiles: int = 0
    graph_replays: int = 0
    eager_calls: int = 0
    graphs_captured: int = 0
    oom_fallbacks: int = 0
    #: graph captures that failed for another reason than memory (the runner then stays eager)
    capture_failures: int = 0

    @property
    def padding_fraction(self) -> float:
        """Share of computed rows that were padding."""
        total = self.tiles + self.padded_tiles
        return self.padded_tiles / total if total else 0.0


class _CapturedForward:
    """One CUDA graph of a forward function at a fixed batch size, with static input and outputs.

    ``static_in`` is a prefix view of the dispatcher's one input buffer (the graphs replay one after
    another on the runner's stream, so they can share it); the forward must have been warmed up at this
    size on ``stream`` already (the dispatcher warms every size up before the first capture).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], tuple[torch.Tensor, tuple[torch.Tensor, ...]]],
        static_in: torch.Tensor,
        pool: Any,
        stream: Any,
    ) -> None:
        self.batch = int(static_in.shape[0])
        self.static_in = static_in
        self.graph = torch.cuda.CUDAGraph()
        # the runner's stream: capture there too, not on torch's default side stream, so that no other
        # stream (and cuBLAS workspace) is involved; thread_local: loader threads may keep using CUDA
        with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        n = x.shape[0]
        self.static_in[:n].copy_(x, non_blocking=True)
        if n < self.batch:  # zero the padding rows so padded replays are deterministic
            self.static_in[n:].zero_()
        self.graph.replay()
        emb, toks = self.static_out
        # the next replay overwrites the static outputs: hand out copies
        return emb[:n].clone(), tuple(t[:n].clone() for t in toks)


class _Dispatcher:
    """Picks a captured graph (padding the batch up to its size) or the eager forward for each batch."""

    def __init__(self, runner: BackboneRunner) -> None:
        self._runner = runner
        self._graphs: dict[tuple[int, bool], _CapturedForward] = {}
        self._pool: Any = None
        self._input: torch.Tensor | None = None  # the graphs' shared static input (largest size)

    @property
    def captured(self) -> tuple[tuple[int, bool], ...]:
        return tuple(sorted(self._graphs))

    def drop(self, above: int = 0) -> None:
        """Forget graphs larger than ``above`` (all by default) so their memory can be released."""
        for key in [k for k in self._graphs if k[0] > above]:
            del self._graphs[key]
        if not self._graphs:
            self._pool = None
            self._input = None

    def capture(self, tokens: bool) -> None:
        """Capture every size up to the batch size for one output mode, largest first (vLLM's order:
        the smaller graphs then fit in the memory pool the largest one left).

        Every missing size is warmed up (eager, on the runner's stream) before the first capture: cuBLAS
        and cuDNN set up and choose kernels there, and the eager activations are back in the cache, which
        ``torch.cuda.graph`` empties, before the graphs' pool takes its memory. (A warm-up between two
        captures would hold its activations beside the pool of the graphs captured before it.)"""
        r = self._runner
        todo = [c for c in sorted(r.capture_sizes, reverse=True) if (c, tokens) not in self._graphs]
        if not todo:
            return
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        s, biggest = r.preset.tile_size, max(r.capture_sizes)

        def fn(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            return r._forward(x, tokens)

        with torch.cuda.stream(r._stream):
            if self._input is None or self._input.shape[0] < biggest:
                self._input = torch.zeros((biggest, 3, s, s), dtype=torch.float32, device=r.device)
            for size in todo:
                for _ in range(WARMUP_ITERS):
                    fn(self._input[:size])
            for size in todo:
                self._graphs[(size, tokens)] = _CapturedForward(fn, self._input[:size], self._pool, r._stream)
                r.stats.graphs_captured += 1
        logger.debug("captured %d CUDA graphs (tokens=%s)", len(todo), tokens)

    def __call__(self, x: torch.Tensor, tokens: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        r, n = self._runner, x.shape[0]
        size = next_capture_size(n, r.capture_sizes) if r.use_cuda_graphs else None
        if size is None:
            out = r._forward(x, tokens)
            r.stats.eager_calls += 1
        else:
            if (size, tokens) not in self._graphs:
                try:
                    self.capture(tokens)
                except RuntimeError as exc:  # OutOfMemoryError included
                    if is_out_of_memory(exc):
                        raise  # the caller shrinks the batch and retries
                    self.drop()
                    r.use_cuda_graphs = False
                    r.stats.capture_failures += 1
                    logger.warning("CUDA graph capture failed on %s (%s); running eagerly", r.device,
                                   f"{type(exc).__name__}: {exc}".splitlines()[0])
                    return self(x, tokens)
            out = self._graphs[(size, tokens)](x)
            r.stats.graph_replays += 1
            r.stats.padded_tiles += size - n
        r.stats.calls += 1
        r.stats.tiles += n
        return out


class BackboneRunner:
    """Runs a backbone preset over uint8 tiles on one device.

    Parameters
    ----------
    preset
        Preset name (``"hoptimus0"``, ``"small"``, ``"tiny"``) or a :class:`BackbonePreset`.
    weights
        Weights file, ``"hf-hub:<repo>"`` / ``"hf-hub"`` (local Hugging Face cache only), or None for a
        seeded random init. See :func:`cellvit_optimus.heads.backbone.build_backbone`.
    device
        ``"cpu"`` or ``"cuda"`` (``"cuda:1"`` etc.).
    dtype
        Compute precision: ``"fp16"``, ``"bf16"`` or ``"fp32"``; default fp16 on CUDA, fp32 on the CPU
        (where fp16 is refused).
    blocks
        1-based blocks whose token maps are returned; default: the preset's four evenly spaced blocks.
    use_cuda_graphs
        Capture the forward in CUDA graphs (CUDA only; ignored on the CPU).
    batch_size
        Tiles per forward; default: fitted to ``vram_budget_gb`` on CUDA, 32 on the CPU.
    vram_budget_gb
        Peak allocated GPU memory (GiB) the chosen batch size may reach, weights included.
    stain_norm
        Optional hook applied on the device to float32 RGB ``(B, 3, S, S)`` in [0, 1] before the mean/std
        normalisation; must return the same shape. Placeholder for stain normalisation.
    tokens
        Default for returning token maps; pass ``tokens=False`` to a call when only embeddings are needed.
    residual
        ``"fp32"`` (default: residual stream, norms and LayerScale in fp32, matmuls under autocast) or
        ``"half"`` (everything in the fp16/bf16 compute type); only with ``dtype`` fp16 or bf16.
    seed, hf_cache_dir
        Passed to :func:`build_backbone`.
    capture_sizes
        Batch sizes to capture (those below ``batch_size``, plus ``batch_size`` itself); default
        :data:`CAPTURE_SIZES`. ``(batch_size,)`` captures a single graph (benchmarks).
    backbone
        An already built :class:`Backbone` of ``preset`` to run instead of building one (shared between
        runners, e.g. eager and graph runners in benchmarks); it is cast and moved in place.

    Calls are serialised by a lock, so one runner may be shared by worker threads.
    """

    def __init__(
        self,
        preset: str | BackbonePreset,
        weights: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: DType | None = None,
        blocks: Sequence[int] | None = None,
        use_cuda_graphs: bool = True,
        batch_size: int | None = None,
        vram_budget_gb: float = 12.0,
        *,
        stain_norm: StainNorm | None = None,
        tokens: bool = True,
        seed: int | None = 0,
        hf_cache_dir: str | os.PathLike[str] | None = None,
        backbone: Backbone | None = None,
        capture_sizes: Sequence[int] | None = None,
        residual: Residual = "fp32",
    ) -> None:
        self.preset = get_preset(preset)
        if backbone is not None and (backbone.preset != self.preset or weights is not None):
            raise ConfigError(
                f"backbone= is a built {backbone.preset.name!r} backbone: pass preset={backbone.preset.name!r} "
                "and no weights with it"
            )
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device={device!r}: not a torch device ({exc})") from exc
        if self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device={device!r}: must be 'cpu' or 'cuda'")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device={device!r}: CUDA is not available to this torch build ({torch.__version__})"
            )
        if self.device.type == "cuda" and self.device.index is None:  # pin the device the graphs live on
            self.device = torch.device("cuda", torch.cuda.current_device())
        if dtype is None:
            dtype = "fp16" if self.device.type == "cuda" else "fp32"
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype={dtype!r}: must be one of {', '.join(_DTYPES)}")
        if dtype == "fp16" and self.device.type == "cpu":
            raise ConfigError("dtype='fp16' on the CPU: use 'fp32' or 'bf16'")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigError(f"batch_size={batch_size!r}: must be a positive integer")
        if capture_sizes is not None and (
            not capture_sizes or any(not isinstance(c, int) or c < 1 for c in capture_sizes)
        ):
            raise ConfigError(f"capture_sizes={capture_sizes!r}: must be positive integers")
        if not vram_budget_gb > 0:
            raise ConfigError(f"vram_budget_gb={vram_budget_gb!r}: must be > 0")
        if stain_norm is not None and not callable(stain_norm):
            raise ConfigError(f"stain_norm={stain_norm!r}: must be a callable or None")
        if blocks is not None:
            self.preset.validate_blocks(blocks)  # fail before building a large model
        if residual not in RESIDUALS:
            raise ConfigError(f"residual={residual!r}: must be one of {', '.join(RESIDUALS)}")
        if residual == "half" and dtype == "fp32":
            raise ConfigError("residual='half' needs dtype 'fp16' or 'bf16' (fp32 has no half residual)")

        self.dtype: DType = dtype
        self.residual: Residual = residual
        self.compute_dtype = _DTYPES[dtype]
        self.tokens_dtype = self.compute_dtype  # raw block outputs, stored at compute precision
        self.use_cuda_graphs = bool(use_cuda_graphs) and self.device.type == "cuda"
        self.vram_budget_gb = float(vram_budget_gb)
        self.stain_norm = stain_norm
        self.tokens = bool(tokens)
        self.stats = RunnerStats()
        self.probe: JsonDict | None = None  # memory fit from the batch-size probe (CUDA)
        #: device time per stage (CUDA events on the runner's stream; the wall clock on the CPU)
        self.stage_times = StageTimes()
        self._lock = threading.Lock()
        # the runners' CUDA stream: copies, probe, warm-ups, captures and forwards (one workspace)
        self._stream: Any = runner_stream(self.device) if self.device.type == "cuda" else None

        if backbone is None:
            backbone = build_backbone(
                self.preset, weights, blocks=blocks, seed=seed, hf_cache_dir=hf_cache_dir
            )
        # a shared prebuilt backbone is converted in place (runners on one device and dtype may share one)
        self.backbone: Backbone = apply_precision(backbone, self.compute_dtype, residual).to(self.device)
        self.blocks: tuple[int, ...] = self.backbone.blocks if blocks is None else tuple(blocks)
        self._mean = torch.tensor(self.preset.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.preset.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._dispatch = _Dispatcher(self)

        sizes = tuple(sorted(set(CAPTURE_SIZES if capture_sizes is None else capture_sizes)))
        if batch_size is None:
            batch_size = self._fit_batch_size(sizes) if self.device.type == "cuda" else DEFAULT_CPU_BATCH_SIZE
        self.batch_size = batch_size
        self.capture_sizes = tuple(sorted({s for s in sizes if s < batch_size} | {batch_size}))

    # -- public -----------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.preset.embed_dim

    @property
    def grid_size(self) -> int:
        return self.preset.grid_size

    @property
    def weights_id(self) -> str:
        """Identity of the weights (file SHA-256 or random seed), for embedding cache keys."""
        return self.backbone.weights_id

    @property
    def calls(self) -> int:
        """Backbone forwards so far (eager calls plus graph replays)."""
        return self.stats.calls

    @property
    def tiles_processed(self) -> int:
        return self.stats.tiles

    @property
    def captured_graphs(self) -> tuple[tuple[int, bool], ...]:
        """``(batch size, tokens)`` of each CUDA graph held."""
        return self._dispatch.captured

    def reset_stats(self) -> None:
        self.stats = RunnerStats()

    def __call__(self, tiles: Tiles, tokens: bool | None = None) -> BackboneOutput:
        """Embed ``tiles``: uint8 ``(B, S, S, 3)`` RGB, numpy or torch, on any device.

        Batches larger than ``batch_size`` are split; outputs stay on the runner's device.
        """
        want_tokens = self.tokens if tokens is None else bool(tokens)
        self._check_tiles(tiles)
        b = int(tiles.shape[0])
        with self._lock, torch.inference_mode():
            if b == 0:
                return self._empty(want_tokens)
            with self._on_stream(tiles) as caller:
                embs: list[torch.Tensor] = []
                toks: list[tuple[torch.Tensor, ...]] = []
                spans: list[DeviceSpan] = []
                start = 0
                while start < b:
                    n = min(self.batch_size, b - start)
                    try:
                        with self.stage_times.span("h2d", self._stream) as h2d:
                            x = self._to_device(tiles[start : start + n])
                        with self.stage_times.span("backbone", self._stream) as fwd:
                            emb, tk = self._dispatch(self._normalise(x), want_tokens)
                    except RuntimeError as exc:  # OOM, also as the RuntimeError of a failed graph capture
                        if not is_out_of_memory(exc) or not self._shrink_batch():
                            raise
                        continue  # same tiles, smaller batch
                    embs.append(emb)
                    toks.append(tk)
                    spans += [sp for sp in (h2d, fwd) if sp is not None]
                    start += n
                if len(embs) == 1:
                    out = BackboneOutput(embs[0], toks[0], tuple(spans))
                else:
                    out = BackboneOutput(torch.cat(embs), tuple(torch.cat(parts) for parts in zip(*toks)),
                                         tuple(spans))
                if caller is not None:  # used on the caller's stream: not reused before its work there
                    for t in (out.embedding, *out.tokens):
                        t.record_stream(caller)
        return out

    @contextlib.contextmanager
    def _on_stream(self, tiles: Tiles) -> Any:
        """run the block on the runner's stream (CUDA): it starts after what the caller queued so far
        (tiles decoded on the device), and the caller's stream waits, on the device, for exactly the
        block's work. Yields the caller's stream (None on the CPU)."""
        if self._stream is None:
            yield None
            return
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        if isinstance(tiles, torch.Tensor) and tiles.is_cuda:  # read on our stream, maybe freed on theirs
            tiles.record_stream(self._stream)
        with torch.cuda.stream(self._stream):
            yield caller
        caller.wait_stream(self._stream)

    def embed(self, tiles: Tiles) -> torch.Tensor:
        """Tile embeddings only ``(B, D)`` float32 (skips the token maps)."""
        return self(tiles, tokens=False).embedding

    def preprocess(self, tiles: Tiles) -> torch.Tensor:
        """The normalised float32 ``(B, 3, S, S)`` input the backbone sees, on the runner's device."""
        self._check_tiles(tiles)
        with torch.inference_mode():
            return self._normalise(self._to_device(tiles))

    def time_stage(self, name: str) -> contextlib.AbstractContextManager[DeviceSpan | None]:
        """time the work the caller queues in the block, on its current stream, as stage ``name`` of
        :attr:`stage_times` (CUDA events; the wall clock on the CPU), e.g. the heads after the backbone"""
        stream = torch.cuda.current_stream(self.device) if self._stream is not None else None
        return self.stage_times.span(name, stream)

    def capture(self, tokens: bool | None = None) -> None:
        """Capture the CUDA graphs now instead of at the first call (no-op without graphs)."""
        if self.use_cuda_graphs:
            with self._lock, torch.inference_mode():
                self._dispatch.capture(self.tokens if tokens is None else bool(tokens))
                if self._stream is not None:
                    torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def release_graphs(self) -> None:
        """Drop every captured graph and return the cached memory to the device, cuBLAS workspaces
        included (they are per stream and survive ``empty_cache``; they come back on the next forward)."""
        self._dispatch.drop()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()
            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return (
            f"BackboneRunner(preset={self.preset.name!r}, device='{self.device}', dtype={self.dtype!r}, "
            f"residual={self.residual!r}, blocks={self.blocks}, batch_size={self.batch_size}, "
            f"cuda_graphs={self.use_cuda_graphs})"
        )

    # -- internals ----------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, tokens: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The function that is run eagerly or captured: normalised fp32 input -> final outputs."""
        if self.compute_dtype == torch.float32:
            ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        elif self.residual == "half":  # the whole model is in the compute type: no casts at all
            ctx = contextlib.nullcontext()
            x = x.to(self.compute_dtype)
        else:  # cache off: required inside graph capture, and the weights are already cast
            ctx = torch.autocast(self.device.type, dtype=self.compute_dtype, cache_enabled=False)
        with ctx:
            emb, toks = self.backbone(x, tokens=tokens, blocks=self.blocks)
        return emb.float(), tuple(t.to(self.tokens_dtype) for t in toks)

    def _check_tiles(self, tiles: Tiles) -> None:
        s = self.preset.tile_size
        if not isinstance(tiles, (np.ndarray, torch.Tensor)):
            raise ConfigError(f"tiles: expected a numpy array or torch tensor, got {type(tiles).__name__}")
        shape = tuple(tiles.shape)
        dtype_ok = tiles.dtype == (np.uint8 if isinstance(tiles, np.ndarray) else torch.uint8)
        if not dtype_ok or len(shape) != 4 or shape[1:] != (s, s, 3):
            raise ConfigError(
                f"tiles: expected uint8 (B, {s}, {s}, 3) for preset {self.preset.name!r}, "
                f"got {str(tiles.dtype).replace('torch.', '')} {shape}"
            )

    def to_device(self, tiles: Tiles) -> torch.Tensor:
        """uint8 tiles as a tensor on the runner's device (pinned, non-blocking copy from the host;
        no copy when already there)"""
        self._check_tiles(tiles)
        return self._to_device(tiles)

    def _to_device(self, tiles: Tiles) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
        if t.device == self.device:
            return t
        if self.device.type == "cuda" and t.device.type == "cpu":
            # pin_memory goes through torch's caching host allocator, which also keeps the block alive
            # until the asynchronous copy has finished
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _normalise(self, t: torch.Tensor) -> torch.Tensor:
        x = t.permute(0, 3, 1, 2).float().div_(255.0)
        if self.stain_norm is not None:
            y = self.stain_norm(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ConfigError(f"stain_norm returned {got}, expected a tensor of shape {tuple(x.shape)}")
            x = y.float()
        return ((x - self._mean) / self._std).contiguous()

    def _empty(self, tokens: bool) -> BackboneOutput:
        d, g = self.embed_dim, self.grid_size
        emb = torch.empty((0, d), dtype=torch.float32, device=self.device)
        toks = tuple(
            torch.empty((0, d, g, g), dtype=self.tokens_dtype, device=self.device) for _ in self.blocks
        )
        return BackboneOutput(emb, toks if tokens else ())

    def _shrink_batch(self) -> bool:
        smaller = [s for s in self.capture_sizes if s < self.batch_size]
        if not smaller:
            return False
        old, self.batch_size = self.batch_size, smaller[-1]
        self.capture_sizes = tuple(smaller)
        self._dispatch.drop(above=self.batch_size)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.stats.oom_fallbacks += 1
        logger.warning(
            "out of memory at batch size %d on %s; continuing at %d", old, self.device, self.batch_size
        )
        return True

    def _fit_batch_size(self, sizes: Sequence[int]) -> int:
        """Largest of ``sizes`` whose fitted peak memory stays within the budget (CUDA only)."""
        dev, s = self.device, self.preset.tile_size
        budget = self.vram_budget_gb * 2**30
        total = torch.cuda.get_device_properties(dev).total_memory
        limit = BUDGET_HEADROOM * min(budget, total)
        peaks, reserved = [], []
        # on the runner's stream, as every later forward: its cuBLAS workspace is in the probe's peak
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            for b in PROBE_SIZES:
                torch.cuda.synchronize(dev)
                torch.cuda.empty_cache()  # so that the reserved peak is this probe's, not the cache's
                torch.cuda.reset_peak_memory_stats(dev)
                try:
                    x = torch.zeros((b, 3, s, s), dtype=torch.float32, device=dev)
                    out = self._forward(x, tokens=True)
                    del x, out
                    torch.cuda.synchronize(dev)
                except RuntimeError as exc:
                    if not is_out_of_memory(exc):
                        raise
                    torch.cuda.empty_cache()
                    logger.warning(
                        "out of memory while probing batch size %d on %s; using batch size 1", b, dev
                    )
                    return 1
                peaks.append(torch.cuda.max_memory_allocated(dev))
                reserved.append(torch.cuda.max_memory_reserved(dev))
        (b1, b2), (p1, p2) = PROBE_SIZES, peaks
        per_tile = max((p2 - p1) / (b2 - b1), (reserved[1] - reserved[0]) / (b2 - b1), 1.0)
        # the device pays for what the caching allocator reserves (rounded segments, fragmentation), not
        # only for what tensors hold: fit on the larger of the two, plus what the probe cannot see
        fixed = max(p1, reserved[0]) - per_tile * b1 + (GRAPH_OVERHEAD_BYTES if self.use_cuda_graphs else 0)
        # every captured graph keeps its static outputs (the input buffer is shared, the largest graph's
        # size, and in the probe's peak): count the smaller graphs' outputs too
        g = self.grid_size
        static_per_tile = 4 * self.embed_dim + torch.finfo(self.tokens_dtype).bits // 8 * (
            len(self.blocks) * self.embed_dim * g * g
        )

        def peak(c: int) -> float:
            extra = static_per_tile * sum(x for x in sizes if x < c) if self.use_cuda_graphs else 0
            return fixed + per_tile * c + extra

        fitting = [c for c in sizes if peak(c) <= limit]
        chosen = fitting[-1] if fitting else 1
        self.probe = {
            "probe_sizes": PROBE_SIZES,
            "probe_peaks_bytes": tuple(peaks),
            "probe_reserved_bytes": tuple(reserved),
            "fixed_bytes": fixed,
            "per_tile_bytes": per_tile,
            "limit_bytes": limit,
            "predicted_peak_bytes": peak(chosen),
            "batch_size": chosen,
        }
        logger.info(
            "batch size %d for a %.1f GiB budget on %s (fitted %.0f MiB + %.1f MiB/tile)",
            chosen,
            self.vram_budget_gb,
            torch.cuda.get_device_name(dev),
            fixed / 2**20,
            per_tile / 2**20,
        )
        return chosen
