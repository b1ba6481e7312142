"""Synchronous entry points that also work where an event loop is already running (notebooks).

``anyio.run`` refuses to start a loop in a thread that runs one already (every Jupyter kernel, and
any async web service calling the library), so the sync APIs (``Engine.run``, ``extract_features``)
go through :func:`run_sync`: with no loop running here it is ``anyio.run``; with one, the work runs
on a fresh loop in a worker thread and this thread waits for it. Waiting blocks the calling thread,
as any synchronous call does: inside a loop, the async APIs (``Engine.stream``,
``aextract_features``) keep it free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ("loop_running", "run_sync")

T = TypeVar("T")


def loop_running() -> bool:
    """True when this thread is inside a running asyncio (or trio) event loop"""
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")  # only imported by programs that use it
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
            return True
        except RuntimeError:
            pass
    return False


def run_sync(main: Callable[[], Awaitable[T]]) -> T:
    """run the coroutine function ``main`` to completion and return its result, from sync code,
    whether or not this thread is already running an event loop"""
    import anyio

    if not loop_running():
        return anyio.run(main)
    # a new loop in its own thread: the caller's loop and its tasks are left untouched
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cellvit-optimus-run") as pool:
        return pool.submit(anyio.run, main).result()
