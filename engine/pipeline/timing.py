"""Stage timings that never stall the device: CUDA events on the GPU, the wall clock on the host.

On CUDA, work is queued: a host clock around a call times its launch, not its work (the scheduler's
``compute_s`` was such a number). A :class:`StageTimes` span records an event on the stream before and
after the work; the elapsed time is read once both events have completed (``query()``), so recording
and reading never wait for the device unless asked to (``totals(wait=True)``, e.g. at the end of a
benchmark). Without a stream, a span is timed with ``time.perf_counter`` (CPU work, host stages).

Where it sits: :class:`~.runner.BackboneRunner` times ``h2d`` and ``backbone`` on its stream (and
hands each call's backbone span on with its output, so the scheduler can add it to the slide's
timings); the nuclei model adds ``heads``; benchmarks read ``runner.stage_times.totals(wait=True)``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ("DeviceSpan", "StageTimes")

#: pending event pairs kept before the oldest are resolved by waiting (bounds memory if never read)
MAX_PENDING = 4096


@dataclass(frozen=True)
class DeviceSpan:
    """the two CUDA events around one piece of queued work"""

    name: str
    start: Any
    end: Any

    def done(self) -> bool:
        return bool(self.end.query())

    def seconds(self) -> float:
        """elapsed device time; waits for the end event (call it where waiting costs nothing)"""
        self.end.synchronize()
        return float(self.start.elapsed_time(self.end)) / 1e3


class StageTimes:
    """seconds and counts per named stage, thread-safe; CUDA spans resolved lazily"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._pending: list[DeviceSpan] = []

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + float(seconds)
            self._counts[name] = self._counts.get(name, 0) + 1

    @contextmanager
    def span(self, name: str, stream: Any = None) -> Iterator[DeviceSpan | None]:
        """time the block: with CUDA events on ``stream`` (a ``torch.cuda.Stream``), else the wall clock.
        Yields the :class:`DeviceSpan` (its end event is recorded when the block exits) or None."""
        if stream is None:
            t = time.perf_counter()
            try:
                yield None
            finally:
                self.add(name, time.perf_counter() - t)
            return
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        sp = DeviceSpan(name, start, end)
        try:
            yield sp
        finally:
            end.record(stream)
            with self._lock:
                self._pending.append(sp)
                overflow = len(self._pending) > MAX_PENDING
            self._resolve(wait=overflow)

    def _resolve(self, wait: bool) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        keep = []
        for sp in pending:
            if wait or sp.done():
                self.add(sp.name, sp.seconds())
            else:
                keep.append(sp)
        if keep:
            with self._lock:
                self._pending[:0] = keep

    def totals(self, wait: bool = False) -> dict[str, float]:
        """``{"<stage>_s": seconds}`` of the spans completed so far (all of them with ``wait=True``)"""
        self._resolve(wait)
        with self._lock:
            return {f"{k}_s": round(v, 6) for k, v in sorted(self._seconds.items())}

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._seconds.clear()
            self._counts.clear()
            self._pending.clear()
