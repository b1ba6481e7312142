"""The async tile scheduler on its own: back-pressure, per-slide failure, cancellation, cache hits.

The stages are stand-ins (a tile lattice per "slide", readers that make uint8 tiles, a compute that
records what it saw) so that each contract of :func:`run_pipeline` is checked exactly; the real
readers and backbone run through it in test_triage.py and test_extract.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

from cellvit_optimus.engine.errors import CorruptSlideError, NotASlideError
from cellvit_optimus.engine.wsi.inspect import Failure
from cellvit_optimus.engine.pipeline.scheduler import BatchOutput, SchedulerConfig, SlideDone, SlideJob, run_pipeline
from cellvit_optimus.engine.wsi.tissue import TileGrid

TILE = 8


def _grid(n: int) -> TileGrid:
    coords = np.stack([np.arange(n) * TILE, np.zeros(n, np.int64)], axis=1).astype(np.int64)
    return TileGrid(coords=coords, grid_index=coords // TILE, tissue_fraction=np.ones(n, np.float32),
                    artefact_fraction=np.zeros(n, np.float32), tile_size=TILE, target_mpp=0.5,
                    level0_size=(TILE, TILE), stride=(TILE, TILE), slide_dimensions=(n * TILE, TILE))


class Recorder:
    """consumer factory + consumers that log every call (thread-safe)"""

    def __init__(self, cached: set[str] = frozenset(), fail_finish: set[str] = frozenset(),
                 fail_batch: dict[str, int] | None = None) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, int]] = []  # (what, slide name, tiles)
        self.cached, self.fail_finish = cached, fail_finish
        self.fail_batch = fail_batch or {}  # slide name -> first tile index whose batch makes on_batch raise
        self.outputs: list[BatchOutput] = []

    def log(self, what: str, job: SlideJob, n: int = 0) -> None:
        with self.lock:
            self.events.append((what, job.path.name, n))

    def prepare(self, job: SlideJob):
        return {"tiles": len(job.grid)} if job.path.name in self.cached else None

    def consumers(self, job: SlideJob):
        rec = self

        class C:
            def on_batch(self, batch):
                limit = rec.fail_batch.get(batch.job.path.name)
                if limit is not None and batch.indices[0] >= limit:
                    raise ValueError(f"{batch.job.path.name}: consumer cannot take tile {int(batch.indices[0])}")
                rec.log("batch", batch.job, len(batch.indices))
                with rec.lock:
                    rec.outputs.append(batch.output)

            def finish(self, job):
                if job.path.name in rec.fail_finish:
                    raise OSError(f"{job.path}: disk full")
                rec.log("finish", job)
                return {"seen": True}

            def abort(self, job):
                rec.log("abort", job)

        return [C()]

    def count(self, what: str, name: str) -> int:
        return sum(n if what == "batch" else 1 for w, s, n in self.events if w == what and s == name)


def _opener(sizes: dict[str, int], bad: set[str] = frozenset()):
    def open_job(job: SlideJob) -> None:
        if job.path.name in bad:
            raise NotASlideError(job.path, "stand-in")
        job.grid = _grid(sizes[job.path.name])

    return open_job


def _reader(fail_at: dict[str, int] | None = None, delay: float = 0.0, live: list | None = None):
    def read(job: SlideJob, idx: np.ndarray):
        if delay:
            time.sleep(delay)
        if fail_at and job.path.name in fail_at and idx[0] >= fail_at[job.path.name]:
            raise CorruptSlideError(job.path, f"tile {int(idx[0])} unreadable")
        if live is not None:
            live.append(len(idx))
        return np.full((len(idx), TILE, TILE, 3), idx[0] % 251, np.uint8), {}

    return read


async def _collect(paths, **kw):
    out = []
    async with run_pipeline(paths, **kw) as results:
        async for r in results:
            out.append(r)
    return out


def test_every_tile_reaches_compute_and_consumers_once():
    sizes = {"a.svs": 70, "b.svs": 5, "c.svs": 33}
    seen: list[int] = []
    rec = Recorder()

    def compute(tiles):
        seen.append(len(tiles))
        return BatchOutput(tiles.mean(axis=(1, 2, 3)))

    cfg = SchedulerConfig(batch_tiles=16, reader_threads=2, queue_batches=2, slides_in_flight=2)
    res = anyio.run(lambda: _collect([Path(p) for p in sizes], open_job=_opener(sizes), factory=rec,
                                     compute=compute, config=cfg, read_tiles=_reader()))
    assert all(isinstance(r, SlideDone) and not r.cached for r in res)
    assert sorted(r.path for r in res) == sorted(sizes)
    assert {Path(r.path).name: r.tiles for r in res} == sizes
    assert sum(seen) == sum(sizes.values()) and max(seen) <= 16
    for name, n in sizes.items():
        assert rec.count("batch", name) == n and rec.count("finish", name) == 1 and rec.count("abort", name) == 0
    # consumers get compute's output of their own tiles: the stand-in reader fills tile i with i % 251
    # at the chunk's first index, so each embedding is that chunk's first index
    assert all(isinstance(o, BatchOutput) for o in rec.outputs)
    firsts = sorted(float(o.embedding[0]) for o in rec.outputs)
    assert firsts == sorted(float(s % 251) for n in sizes.values() for s in range(0, n, 16))


def test_backpressure_bounds_the_tiles_in_memory():
    """a slow backbone: the readers wait instead of buffering the whole slide"""
    n, bt = 400, 4
    cfg = SchedulerConfig(batch_tiles=bt, reader_threads=2, queue_batches=2, slides_in_flight=1)
    read_log: list[int] = []
    lock = threading.Lock()
    state = {"read": 0, "computed": 0, "max_ahead": 0}

    def read(job, idx):
        with lock:
            state["read"] += len(idx)
            state["max_ahead"] = max(state["max_ahead"], state["read"] - state["computed"])
        read_log.append(len(idx))
        return np.zeros((len(idx), TILE, TILE, 3), np.uint8), {}

    def compute(tiles):
        time.sleep(0.01)
        with lock:
            state["computed"] += len(tiles)
        return np.zeros(len(tiles))

    res = anyio.run(lambda: _collect([Path("big.svs")], open_job=_opener({"big.svs": n}), factory=Recorder(),
                                     compute=compute, config=cfg, read_tiles=read))
    assert isinstance(res[0], SlideDone) and state["computed"] == n
    # the documented bound: queue_batches + reader_threads + 3 batches between reading and compute
    bound = (cfg.queue_batches + cfg.reader_threads + 3) * bt
    print("tiles read ahead of compute:", state["max_ahead"], "bound", bound)
    assert bt < state["max_ahead"] <= bound < n


def test_one_failing_slide_is_aborted_and_the_others_finish():
    sizes = {"a.svs": 40, "bad-read.svs": 40, "not-a-slide.svs": 1, "c.svs": 10, "finish-fails.svs": 12}
    rec = Recorder(fail_finish={"finish-fails.svs"})
    cfg = SchedulerConfig(batch_tiles=8, reader_threads=2, queue_batches=2, slides_in_flight=2)
    res = anyio.run(lambda: _collect([Path(p) for p in sizes], open_job=_opener(sizes, bad={"not-a-slide.svs"}),
                                     factory=rec, compute=lambda t: np.zeros(len(t)), config=cfg,
                                     read_tiles=_reader(fail_at={"bad-read.svs": 16})))
    by = {Path(r.path).name: r for r in res}
    assert set(by) == set(sizes)
    for ok in ("a.svs", "c.svs"):
        assert isinstance(by[ok], SlideDone) and by[ok].info["seen"] is True
        assert rec.count("batch", ok) == sizes[ok] and rec.count("abort", ok) == 0
    f = by["bad-read.svs"]
    assert isinstance(f, Failure) and f.reason == CorruptSlideError.reason and "bad-read.svs" in f.message
    assert rec.count("abort", "bad-read.svs") == 1 and rec.count("finish", "bad-read.svs") == 0
    assert rec.count("batch", "bad-read.svs") < 40
    assert isinstance(by["not-a-slide.svs"], Failure) and by["not-a-slide.svs"].reason == NotASlideError.reason
    g = by["finish-fails.svs"]
    assert isinstance(g, Failure) and "disk full" in g.message and rec.count("abort", "finish-fails.svs") == 1


def test_a_consumer_failing_mid_slide_aborts_that_slide_only():
    """on_batch raising: the slide is aborted (never finished), its later batches skip compute, the
    other slides finish in full"""
    sizes = {"a.svs": 24, "broken-consumer.svs": 400, "c.svs": 24}
    rec = Recorder(fail_batch={"broken-consumer.svs": 16})
    read_n: dict[str, int] = {}
    lock = threading.Lock()

    def compute(tiles):
        time.sleep(0.002)
        return BatchOutput(np.zeros(len(tiles)))

    def read(job, idx):
        with lock:
            read_n[job.path.name] = read_n.get(job.path.name, 0) + len(idx)
        return np.zeros((len(idx), TILE, TILE, 3), np.uint8), {}

    cfg = SchedulerConfig(batch_tiles=8, reader_threads=1, queue_batches=1, slides_in_flight=1)
    res = anyio.run(lambda: _collect([Path(p) for p in sizes], open_job=_opener(sizes), factory=rec,
                                     compute=compute, config=cfg, read_tiles=read))
    by = {Path(r.path).name: r for r in res}
    f = by["broken-consumer.svs"]
    assert isinstance(f, Failure) and "consumer cannot take tile 16" in f.message
    assert rec.count("batch", "broken-consumer.svs") == 16  # the two batches before the failing one
    assert rec.count("abort", "broken-consumer.svs") == 1 and rec.count("finish", "broken-consumer.svs") == 0
    # one slide in flight, one-batch queues: reading stops well before the slide's end
    assert read_n["broken-consumer.svs"] <= 16 + 8 * 8 < sizes["broken-consumer.svs"]
    for ok in ("a.svs", "c.svs"):
        assert isinstance(by[ok], SlideDone) and rec.count("batch", ok) == sizes[ok]
        assert rec.count("finish", ok) == 1 and rec.count("abort", ok) == 0


def test_cache_hits_are_served_without_reading():
    sizes = {"a.svs": 20, "b.svs": 20}
    rec = Recorder(cached={"a.svs"})
    reads: list[int] = []
    res = anyio.run(lambda: _collect([Path(p) for p in sizes], open_job=_opener(sizes), factory=rec,
                                     compute=lambda t: np.zeros(len(t)), read_tiles=_reader(live=reads)))
    by = {Path(r.path).name: r for r in res}
    assert by["a.svs"].cached and not by["b.svs"].cached
    assert rec.count("batch", "a.svs") == 0 and sum(reads) == 20


def test_leaving_early_cancels_every_stage_and_aborts_open_slides():
    """the host stops listening after the first result: no stage keeps running, nothing is left open"""
    sizes = {"small.svs": 2, "long-1.svs": 3000, "long-2.svs": 3000}
    rec = Recorder()
    calls: list[float] = []

    def compute(tiles):
        calls.append(time.monotonic())
        time.sleep(0.005)
        return np.zeros(len(tiles))

    cfg = SchedulerConfig(batch_tiles=4, reader_threads=2, queue_batches=2, slides_in_flight=3)

    async def main():
        with anyio.fail_after(60):
            return await first_result()

    async def first_result():
        async with run_pipeline([Path(p) for p in sizes], open_job=_opener(sizes), factory=rec,
                                compute=compute, config=cfg, read_tiles=_reader()) as results:
            async for r in results:
                return r

    first = anyio.run(main)
    t_exit = time.monotonic()
    assert isinstance(first, SlideDone) and Path(first.path).name == "small.svs"
    time.sleep(0.3)
    assert not [t for t in calls if t > t_exit + 0.1], "compute kept running after the pipeline was left"
    assert rec.count("abort", "long-1.svs") == 1 and rec.count("finish", "long-1.svs") == 0
    assert sum(n for w, s, n in rec.events if w == "batch") < 6000


def test_scheduler_config_rejects_bad_sizes():
    with pytest.raises(Exception, match="reader_threads=0"):
        SchedulerConfig(reader_threads=0)


def test_stage_timings_per_slide_with_device_spans_read_after_the_consumers():
    """read and consumer time per slide, and each batch's device spans (CUDA events on a GPU; stand-ins
    here that count when they are read) added to the slide after its consumers ran"""
    sizes = {"a.svs": 40, "b.svs": 9}
    rec = Recorder()
    reads_after_consume: list[bool] = []

    class Span:
        name = "backbone"

        def __init__(self, n: int) -> None:
            self.n = n

        def seconds(self) -> float:
            reads_after_consume.append(len(rec.outputs) > 0)
            return 0.001 * self.n

    def compute(tiles):
        return BatchOutput(tiles.mean(axis=(1, 2, 3)), spans=(Span(len(tiles)),))

    cfg = SchedulerConfig(batch_tiles=8, reader_threads=2)
    res = anyio.run(lambda: _collect([Path(p) for p in sizes], open_job=_opener(sizes), factory=rec,
                                     compute=compute, config=cfg, read_tiles=_reader(delay=0.01)))
    by = {Path(r.path).name: r.timings for r in res}
    for name, n in sizes.items():
        t = by[name]
        assert {"open_s", "read_s", "compute_s", "consume_s", "backbone_s", "total_s"} <= set(t), t
        assert t["backbone_s"] == pytest.approx(0.001 * n)  # every batch's span, once
        assert t["read_s"] >= 0.01 * -(-n // 8) * 0.9  # the readers' sleeps, summed over threads
    assert reads_after_consume and all(reads_after_consume)
