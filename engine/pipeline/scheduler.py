"""The async tile scheduler: slides -> tissue tiles -> reader threads -> backbone -> fan-out consumers.

An anyio pipeline with bounded memory object streams between stages, so a fast stage waits for a
slow one instead of buffering (backpressure)::

    slide source --chunks--> readers (threads) --tiles--> backbone (thread) --outputs--> fan-out
        |  opens slides, tissue grid, cache check      |  pinned copy, GPU normalise  |  consumers per slide
        '-- at most `slides_in_flight` slides open                                    '-- writers, heads, safety

Blocking work (slide decoding, the backbone forward, HDF5 writes) runs in worker threads through
``anyio.to_thread.run_sync`` with capacity limiters, so the event loop itself never blocks and the
pipeline can run inside a host application's asyncio or anyio loop. A failing slide is recorded as a
:class:`~cellvit_optimus.engine.wsi.inspect.Failure` and the others go on; cancelling the surrounding scope
cancels every stage. Host memory holds at most ``queue_batches + reader_threads + 3`` batches of tiles
whatever the slide size (the tile stream, one per reader, one waiting at the backbone, one being handed
to it, one in the forward); the consumers stream their outputs to disk.

The backbone runs in one thread for the whole run, fed through a one-batch hand-off queue, so no
event-loop round trip sits between two forward passes.

Consumers implement :class:`SlideConsumer`. The feature writer is one; the nuclei head, post-processing
and safety plug into the same fan-out.

Per-slide timings (``SlideDone.timings``, seconds): ``open_s``, ``read_s`` (reader threads, summed),
``compute_s`` (host time in ``compute``: on CUDA that is the launch of queued work unless ``compute``
waits for it), ``consume_s`` (the consumers: writers, post-processing, stitching), ``total_s``, and the
device-timed stages a batch's output carries (``BatchOutput.spans``, CUDA events: ``h2d_s``,
``backbone_s``), read in the consumer thread after the consumers, when the work is done.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import numpy as np

from cellvit_optimus.engine.errors import ConfigError, OptimusError
from cellvit_optimus.engine.settings import EXTRACT_READ_CHUNK, READER_THREADS
from cellvit_optimus.engine.wsi import SlideFacts

if TYPE_CHECKING:
    import torch

    from cellvit_optimus.engine.pipeline.nuclei import NucleiMaps
    from cellvit_optimus.engine.pipeline.timing import DeviceSpan
    from cellvit_optimus.engine.wsi import Failure, Slide, TileGrid, TissueMask

__all__ = ("SchedulerConfig", "SlideJob", "BatchOutput", "TileBatch", "SlideConsumer", "ConsumerFactory",
           "Progress", "SlideDone", "ConsumerFacts", "run_pipeline")

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a thread blocked on a full/empty hand-off queue checks for cancellation
_TIMINGS_LOCK = threading.Lock()  # reader threads add to one slide's timings (and facts) at once

#: what a consumer's ``finish`` (or a factory's cache hit) adds to a slide's result: named public
#: facts, e.g. ``{"features": "<the feature file>"}``; shown in :attr:`SlideDone.info`
ConsumerFacts = Mapping[str, object]


def _add_time(job: SlideJob, key: str, seconds: float) -> None:
    with _TIMINGS_LOCK:
        job.timings[key] = job.timings.get(key, 0.0) + seconds


@dataclass(frozen=True)
class SchedulerConfig:
    """sizes of the pipeline's stages and buffers"""

    batch_tiles: int = EXTRACT_READ_CHUNK  # tiles per read chunk (settings: read chunk vs forward batch)
    reader_threads: int = READER_THREADS  # concurrent slide reads (each decodes a chunk; cuCIM adds threads)
    queue_batches: int = 4  # capacity of each stream between stages, in batches
    slides_in_flight: int = 2  # slides open at once (the next one starts while the last drains)
    decode_workers: int = 2  # cuCIM decoder threads per batched read

    def __post_init__(self) -> None:
        for name in ("batch_tiles", "reader_threads", "queue_batches", "slides_in_flight", "decode_workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer")


@dataclass
class SlideJob:
    """one slide on its way through the pipeline"""

    index: int  # position in the input list
    path: Path
    slide: Slide | None = None
    grid: TileGrid | None = None
    consumers: list[SlideConsumer] = field(default_factory=list)
    remaining: int = 0
    failed: BaseException | None = None
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    facts: SlideFacts = field(default_factory=SlideFacts)
    reader: Any = None  # a per-slide tile reader beside the slide (the GPU read path), closed with it
    mask: TissueMask | None = None  # the tissue mask, kept by openers asked to (overview images need it)

    def note(self, **changes: Any) -> SlideFacts:
        """record facts about the slide (fields of :class:`SlideFacts`): ``facts`` is replaced by a new
        record, under a lock, since reader threads add to it while others read it"""
        with _TIMINGS_LOCK:
            self.facts = replace(self.facts, **changes)
            return self.facts

    def close(self) -> None:
        """close the slide and its tile reader (idempotent)"""
        for thing in (self.reader, self.slide):
            if thing is not None:
                thing.close()
        self.reader = None


@dataclass
class BatchOutput:
    """what ``compute`` hands the consumers for one batch of tiles

    ``embedding``: ``(n, D)`` tile embeddings (numpy float32, or a torch tensor on the backbone's
    device: consumers convert what they keep); ``tokens``: the backbone's token maps when they were
    asked for; ``nuclei``: the nuclei head's maps (:class:`~.nuclei.NucleiMaps`) when a head ran;
    ``spans``: device-timed stages of the batch (:class:`~.timing.DeviceSpan`, e.g. the runner's
    ``BackboneOutput.spans``), added to the slide's timings once the consumers are done with it.
    """

    embedding: np.ndarray | torch.Tensor
    tokens: tuple[torch.Tensor, ...] = ()
    nuclei: NucleiMaps | None = None
    spans: tuple[DeviceSpan, ...] = ()


@dataclass
class TileBatch:
    """a chunk of one slide's tiles (uint8) and, after the backbone, its outputs"""

    job: SlideJob
    indices: np.ndarray  # (n,) tile indices into job.grid
    tiles: np.ndarray  # (n, S, S, 3) uint8
    quality: dict[str, np.ndarray]
    output: BatchOutput | None = None  # once computed


class SlideConsumer(Protocol):
    """receives one slide's batches after the backbone; called from worker threads, one at a time per slide"""

    def on_batch(self, batch: TileBatch) -> None: ...

    def finish(self, job: SlideJob) -> ConsumerFacts: ...  # returns facts merged into the slide result

    def abort(self, job: SlideJob) -> None: ...


class ConsumerFactory(Protocol):
    """per slide: either a finished result (cache hit: nothing to compute) or the consumers to feed"""

    def prepare(self, job: SlideJob) -> ConsumerFacts | None: ...

    def consumers(self, job: SlideJob) -> list[SlideConsumer]: ...


@dataclass
class Progress:
    """what the progress callback receives"""

    slides_done: int
    slides_total: int
    tiles_done: int
    tiles_total: int  # known so far (grows as slides are opened)
    tiles_per_s: float
    elapsed_s: float
    current: str | None = None


@dataclass
class SlideDone:
    """a slide that went through every stage (or was served from the cache)

    ``facts`` is what the slide carried through the run (:class:`SlideFacts`); ``consumer_facts`` what
    the factory's cache hit or the consumers' ``finish`` added (public facts only, e.g. ``features``);
    per-slide state a factory needs afterwards it keeps itself, by ``index``."""

    index: int
    path: str
    tiles: int
    cached: bool
    timings: dict[str, float]
    facts: SlideFacts = field(default_factory=SlideFacts)
    consumer_facts: ConsumerFacts = field(default_factory=dict)

    @property
    def info(self) -> dict[str, object]:
        """``facts`` and ``consumer_facts`` as one plain mapping (with :meth:`SlideFacts.as_info`'s keys)"""
        return {**self.facts.as_info(), **self.consumer_facts}


class _Pipeline:
    """one run of :func:`run_pipeline`: its streams, limiters and counters, one method per stage"""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], open_job: Callable[[SlideJob], None],
                 factory: ConsumerFactory, compute: Callable[[np.ndarray], BatchOutput], cfg: SchedulerConfig,
                 read_tiles: Callable[[SlideJob, np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]] | None,
                 progress: Callable[[Progress], None] | None) -> None:
        self.paths, self.open_job, self.factory, self.compute = paths, open_job, factory, compute
        self.cfg, self.progress = cfg, progress
        self.reader = read_tiles or _default_read
        self.total_slides = len(paths)
        self.slides_done = self.tiles_done = self.tiles_total = 0
        self.t0 = time.perf_counter()
        self.read_limiter = anyio.CapacityLimiter(cfg.reader_threads)
        self.compute_limiter = anyio.CapacityLimiter(1)
        self.consume_limiter = anyio.CapacityLimiter(1)
        self.open_limiter = anyio.CapacityLimiter(1)
        self.feed_limiter = anyio.CapacityLimiter(1)
        self.fanout_limiter = anyio.CapacityLimiter(1)
        self.slide_slots = anyio.Semaphore(cfg.slides_in_flight)
        self.chunk_send, self.chunk_recv = anyio.create_memory_object_stream[tuple[SlideJob, np.ndarray]](
            cfg.queue_batches)
        self.tile_send, self.tile_recv = anyio.create_memory_object_stream[TileBatch](cfg.queue_batches)
        self.result_send, self.result_recv = anyio.create_memory_object_stream[Any](max(1, self.total_slides))
        self.active: dict[int, SlideJob] = {}  # slides with live consumers, for clean-up on cancellation
        # The backbone is the stage whose pace sets the run's (on a GPU it is the costly one), so it gets
        # a thread of its own for the whole run, fed through a small thread-safe queue: its next batch is
        # already there when one finishes, and no event-loop round trip sits between two forwards.
        # (A to_thread hop per batch cost ~1 ms under load: 8 % of a 13 ms batch.)
        self.ready: queue.Queue[TileBatch | None] = queue.Queue(maxsize=1)
        self.computed: queue.Queue[TileBatch | None] = queue.Queue(maxsize=cfg.queue_batches)

    def report(self, current: str | None = None) -> None:
        if self.progress is None:
            return
        el = time.perf_counter() - self.t0
        self.progress(Progress(self.slides_done, self.total_slides, self.tiles_done, self.tiles_total,
                               self.tiles_done / el if el > 0 else 0.0, el, current))

    async def finish(self, job: SlideJob, ok: bool) -> None:
        """close one slide: commit or abort its consumers, emit its result, free its slot"""
        from cellvit_optimus.engine.wsi import failure_from

        self.active.pop(job.index, None)
        try:
            if ok and job.failed is None:
                added: dict[str, object] = {}
                for c in job.consumers:
                    added.update(await anyio.to_thread.run_sync(c.finish, job, limiter=self.consume_limiter))
                job.timings["total_s"] = time.perf_counter() - job.started
                await self.result_send.send(SlideDone(job.index, str(job.path), len(job.grid) if job.grid else 0,
                                                      False, job.timings, job.facts, added))
            else:
                for c in job.consumers:
                    await anyio.to_thread.run_sync(c.abort, job, limiter=self.consume_limiter)
                await self.result_send.send(failure_from(job.path, job.failed or RuntimeError("aborted")))
        except Exception as exc:  # a consumer failing to finish fails this slide only
            job.failed = exc
            log.warning("%s: finishing failed: %s", job.path, exc)
            for c in job.consumers:
                try:
                    await anyio.to_thread.run_sync(c.abort, job, limiter=self.consume_limiter)
                except Exception:  # already broken; nothing more to undo
                    pass
            await self.result_send.send(failure_from(job.path, exc))
        finally:
            job.close()
            self.slides_done += 1
            self.slide_slots.release()
            self.report(job.path.name)

    async def drop(self, job: SlideJob, n: int) -> None:
        """``n`` of a failed slide's tiles will never reach the fan-out: the last one closes the slide"""
        job.remaining -= n
        if job.remaining == 0:
            await self.finish(job, ok=False)

    async def start_slide(self, job: SlideJob) -> bool:
        """open ``job`` and ask the factory for a cache hit or its consumers; False when the slide
        needs no tiles read (served from the cache, or failed: its result is already sent)"""
        try:
            t = time.perf_counter()
            await anyio.to_thread.run_sync(self.open_job, job, limiter=self.open_limiter)
            job.timings["open_s"] = time.perf_counter() - t
            hit = await anyio.to_thread.run_sync(self.factory.prepare, job, limiter=self.consume_limiter)
            if hit is not None:
                job.close()
                self.slides_done += 1
                self.slide_slots.release()
                tiles = hit.get("tiles", 0)  # an opener that lays no grid may name the count
                n = len(job.grid) if job.grid is not None else int(tiles) if isinstance(tiles, int) else 0
                await self.result_send.send(SlideDone(job.index, str(job.path), n, True, job.timings,
                                                      job.facts, dict(hit)))
                self.report(job.path.name)
                return False
            job.consumers = await anyio.to_thread.run_sync(self.factory.consumers, job,
                                                           limiter=self.consume_limiter)
            self.active[job.index] = job
        except Exception as exc:
            # info, not warning: the slide's Failure result carries the message to the caller
            log.info("%s", exc if isinstance(exc, OptimusError) else f"{job.path}: {exc!r}")
            job.failed = exc
            await self.finish(job, ok=False)
            return False
        return True

    async def source(self) -> None:
        """slides in input order, at most ``slides_in_flight`` open; each one's tiles as chunks"""
        async with self.chunk_send:
            for i, p in enumerate(self.paths):
                await self.slide_slots.acquire()
                job = SlideJob(index=i, path=Path(p))
                if not await self.start_slide(job):
                    continue
                assert job.grid is not None
                n = len(job.grid)
                job.remaining = n
                self.tiles_total += n
                self.report(job.path.name)  # the slide's tiles are planned (the CLI's plan line)
                sent = 0
                for start in range(0, n, self.cfg.batch_tiles):
                    if job.failed is not None:
                        break
                    idx = np.arange(start, min(n, start + self.cfg.batch_tiles))
                    await self.chunk_send.send((job, idx))
                    sent += len(idx)
                if sent < n:  # the slide failed while its chunks were queued: account for the rest
                    await self.drop(job, n - sent)

    async def read_worker(self, send: Any) -> None:
        async with send:
            async for job, idx in self.chunk_recv:
                if job.failed is not None:
                    await self.drop(job, len(idx))
                    continue
                try:
                    tiles, quality = await anyio.to_thread.run_sync(self.timed_read, job, idx,
                                                                    limiter=self.read_limiter)
                except Exception as exc:
                    log.info("%s", exc if isinstance(exc, OptimusError) else f"{job.path}: {exc!r}")
                    if job.failed is None:
                        job.failed = exc
                    await self.drop(job, len(idx))
                    continue
                await send.send(TileBatch(job, idx, tiles, quality))

    def timed_read(self, job: SlideJob, idx: np.ndarray) -> tuple[Any, dict[str, np.ndarray]]:
        t = time.perf_counter()
        try:
            return self.reader(job, idx)
        finally:
            _add_time(job, "read_s", time.perf_counter() - t)

    def compute_loop(self) -> None:
        """the backbone thread: one batch after another until the end marker"""
        while (batch := _get(self.ready)) is not None:
            if batch.job.failed is None:
                t = time.perf_counter()
                batch.output = self.compute(batch.tiles)
                batch.job.timings["compute_s"] = batch.job.timings.get("compute_s", 0.0) + time.perf_counter() - t
            _put(self.computed, batch)
        _put(self.computed, None)

    async def compute_worker(self) -> None:
        await anyio.to_thread.run_sync(self.compute_loop, limiter=self.compute_limiter)

    async def feed_compute(self) -> None:
        async with self.tile_recv:
            async for batch in self.tile_recv:
                await anyio.to_thread.run_sync(_put, self.ready, batch, limiter=self.feed_limiter)
        await anyio.to_thread.run_sync(_put, self.ready, None, limiter=self.feed_limiter)

    async def fanout(self) -> None:
        # waiting for the backbone holds its own limiter, so consumer calls of other slides go on
        while (batch := await anyio.to_thread.run_sync(_get, self.computed, limiter=self.fanout_limiter)) is not None:
            job = batch.job
            if job.failed is None and batch.output is not None:
                await anyio.to_thread.run_sync(_consume, batch, limiter=self.consume_limiter)
            if batch.output is not None:
                self.tiles_done += len(batch.indices)
            job.remaining -= len(batch.indices)
            self.report(job.path.name)
            if job.remaining == 0:
                await self.finish(job, ok=job.failed is None)

    async def run_all(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.source)
            async with self.tile_send:
                for _ in range(self.cfg.reader_threads):
                    tg.start_soon(self.read_worker, self.tile_send.clone())
            tg.start_soon(self.feed_compute)
            tg.start_soon(self.compute_worker)
            tg.start_soon(self.fanout)
        await self.result_send.aclose()

    def abort_open_slides(self) -> None:
        """cancelled mid-slide: nothing half-written may stay behind"""
        for job in list(self.active.values()):
            for c in job.consumers:
                try:
                    c.abort(job)
                except Exception as exc:  # keep cleaning the others
                    log.warning("%s: abort failed: %s", job.path, exc)
            job.close()
        self.active.clear()


def _default_read(job: SlideJob, idx: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """the slide reader at the grid's resolution, plus tile quality"""
    from cellvit_optimus.engine.wsi import tile_quality

    grid = job.grid
    assert job.slide is not None and grid is not None
    locs = [tuple(c) for c in grid.coords[idx].tolist()]
    tiles = job.slide.read_tiles(locs, grid.tile_size, grid.target_mpp)
    return tiles, tile_quality(tiles)


def _put(q: queue.Queue[Any], item: Any) -> None:
    """a blocking put that still notices the pipeline being cancelled"""
    while True:
        try:
            q.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            anyio.from_thread.check_cancelled()


def _get(q: queue.Queue[Any]) -> Any:
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            anyio.from_thread.check_cancelled()


def _consume(batch: TileBatch) -> None:
    """every consumer of the batch's slide; the first to raise fails that slide only. Then the batch's
    device-timed stages go into the slide's timings (waiting for them costs nothing here: the
    consumers have copied the outputs to the host, and this is a consumer thread, not the backbone's)"""
    t = time.perf_counter()
    try:
        for c in batch.job.consumers:
            c.on_batch(batch)
    except Exception as exc:
        log.warning("%s: consumer failed: %s", batch.job.path, exc)
        batch.job.failed = exc
    _add_time(batch.job, "consume_s", time.perf_counter() - t)
    for sp in getattr(batch.output, "spans", ()):
        try:
            _add_time(batch.job, f"{sp.name}_s", sp.seconds())
        except Exception as exc:  # a timing is never worth a slide
            log.debug("%s: stage timing %s unreadable: %s", batch.job.path, sp.name, exc)


@asynccontextmanager
async def run_pipeline(
    paths: Sequence[str | os.PathLike[str]],
    *,
    open_job: Callable[[SlideJob], None],
    factory: ConsumerFactory,
    compute: Callable[[np.ndarray], BatchOutput],
    config: SchedulerConfig | None = None,
    read_tiles: Callable[[SlideJob, np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]] | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> AsyncIterator[AsyncIterator[SlideDone | Failure]]:
    """stream every tissue tile of ``paths`` through ``compute``; use as
    ``async with run_pipeline(...) as results: async for r in results: ...`` — per-slide results
    arrive as slides finish. Leaving the block early cancels the pipeline.

    ``open_job`` (run in a thread) opens the slide and sets ``job.slide`` / ``job.grid``; ``compute``
    (run in a thread) maps uint8 tiles (n, S, S, 3) to the batch's :class:`BatchOutput`; ``read_tiles``
    (thread) reads a chunk (default: ``slide.read_tiles`` at the grid's resolution plus tile quality).
    """
    run = _Pipeline(paths, open_job, factory, compute, config or SchedulerConfig(), read_tiles, progress)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run.run_all)
        try:
            async with run.result_recv:
                yield run.result_recv
        finally:
            tg.cancel_scope.cancel()  # no-op when every stage already finished
            run.abort_open_slides()
