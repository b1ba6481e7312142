"""Kill a batch subprocess with SIGKILL part-way through its second slide (resume tests).

The subprocess prints ``slides_done tiles_done tiles_total`` on every progress event.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest


def kill_during_second_slide(cmd: list[str], fraction: float = 0.25) -> None:
    """run ``cmd``; SIGKILL it once slide 1 is finished and ``fraction`` of slide 2's tiles are done"""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = None
    try:
        for line in proc.stdout:
            words = line.split()
            if len(words) != 3 or not all(w.isdigit() for w in words):
                continue  # a native library's own printf (cuFile's "dlopen error ..." with CUDA-13 wheels)
            slides_done, tiles_done, tiles_total = map(int, words)
            if slides_done == 1 and first is None:
                first = tiles_done
            if first is not None and tiles_total > first and \
                    tiles_done - first > (tiles_total - first) * fraction:
                os.kill(proc.pid, signal.SIGKILL)
                break
        else:
            pytest.fail("the batch ended before it could be killed during its second slide")
    finally:
        proc.kill()
        proc.wait()
