"""HV post-processing: Numba kernels vs the scipy/skimage reference on real maps, side by side.

Inputs are real: NP/HV targets of MoNuSeg image TCGA-AR-A1AK (1000x1000, padded to 1024 with
background) made model-like (blurred, noisy), and a 256 px crop of it. Groups:

* ``hv-256`` / ``hv-1024``: one tile, full output (label map + instance table with contours): the
  kernel in ``hovernet`` mode (same algorithm as the reference, exact agreement), in the default
  ``optimus`` mode, and the reference; ``*-map`` variants skip the per-instance table.
* ``hv-256-batch32`` / ``hv-1024-batch8``: :func:`hv_to_instances_batch` (tiles over threads) vs the
  reference looped over the same batch; ``extra_info["per_tile_ms"]`` gives per-tile throughput.
* ``compile``: first call in fresh interpreters with ``NUMBA_CACHE_DIR`` pointed at an empty temporary
  directory (true JIT compile, single tile and batch) and with the populated cache (load), in
  ``extra_info``; steady state is what the other groups time.

Each benchmark's ``extra_info`` also holds the process CPU time per call (``cpu_ms``): the machine is
shared, so compare ratios from one run and prefer CPU time when the load is high.

Run: ``pytest bench/test_bench_kernels.py --benchmark-only``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
from reference_hovernet import noisy_maps, reference_hv_to_instances, reference_instance_map

from cellvit_optimus.engine.training.datasets import load_monuseg
from cellvit_optimus.kernels import hv_to_instances, hv_to_instances_batch, instances_to_hv

BATCH = {256: 32, 1024: 8}


@pytest.fixture(scope="module")
def maps(nuclei_dir):
    s = [x for x in load_monuseg(nuclei_dir) if "A1AK" in x.name][0]
    gt = np.pad(s.inst_map, 12)
    np_t, hv = instances_to_hv(gt)
    np_t, hv = noisy_maps(np_t, hv, seed=0)
    out = {1024: (np_t, hv), 256: (np.ascontiguousarray(np_t[300:556, 300:556]), np.ascontiguousarray(hv[:, 300:556, 300:556]))}
    for p, h in out.values():  # warm the kernels (compile or load from cache) outside the timings
        for mode in ("hovernet", "optimus"):
            hv_to_instances(p, h, mode=mode)
            hv_to_instances_batch(p[None], h[None], mode=mode)
    return out


def _timed(benchmark, fn, rounds):
    """benchmark.pedantic plus the mean process CPU time per call in extra_info."""
    cpu = []

    def call():
        c0 = time.process_time()
        r = fn()
        cpu.append(time.process_time() - c0)
        return r

    out = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["cpu_ms"] = 1e3 * float(np.median(cpu[1:] if len(cpu) > 1 else cpu))
    return out


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("impl", ["numba-hovernet", "numba-optimus", "reference"])
def test_hv_full(benchmark, maps, size, impl):
    benchmark.group = f"hv-{size}"
    p, h = maps[size]
    if impl == "reference":
        fn = lambda: reference_hv_to_instances(p, h)  # noqa: E731
    else:
        mode = impl.split("-")[1]
        fn = lambda: hv_to_instances(p, h, mode=mode)  # noqa: E731
    inst, _ = _timed(benchmark, fn, 5 if size == 1024 else 30)
    benchmark.extra_info["instances"] = int(inst.max())


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("impl", ["numba-hovernet", "numba-optimus", "reference"])
def test_hv_map_only(benchmark, maps, size, impl):
    benchmark.group = f"hv-{size}-map"
    p, h = maps[size]
    if impl == "reference":
        fn = lambda: reference_instance_map(p, h)  # noqa: E731
    else:
        mode = impl.split("-")[1]
        fn = lambda: hv_to_instances(p, h, mode=mode, with_table=False)  # noqa: E731
    _timed(benchmark, fn, 5 if size == 1024 else 30)


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("impl", ["numba-batch-hovernet", "numba-batch-optimus", "reference-loop"])
def test_hv_batch(benchmark, maps, size, impl):
    b = BATCH[size]
    benchmark.group = f"hv-{size}-batch{b}"
    p, h = maps[size]
    # distinct tiles (flipped / transposed copies; HV channels follow the geometry) of the same real maps
    ps, hs = [], []
    for k in range(b):
        pk, hk = p, h
        if k & 1:
            pk, hk = pk[:, ::-1], np.stack([-hk[0][:, ::-1], hk[1][:, ::-1]])
        if k & 2:
            pk, hk = pk[::-1], np.stack([hk[0][::-1], -hk[1][::-1]])
        if k & 4:
            pk, hk = pk.T, np.stack([hk[1].T, hk[0].T])
        ps.append(pk)
        hs.append(hk)
    pb = np.ascontiguousarray(np.stack(ps))
    hb = np.ascontiguousarray(np.stack(hs))
    if impl == "reference-loop":
        fn = lambda: [reference_hv_to_instances(pb[i], hb[i]) for i in range(b)]  # noqa: E731
        rounds = 2 if size == 1024 else 3
    else:
        mode = impl.split("-")[2]
        fn = lambda: hv_to_instances_batch(pb, hb, mode=mode)  # noqa: E731
        rounds = 5 if size == 1024 else 10
    _timed(benchmark, fn, rounds)
    benchmark.extra_info["batch"] = b
    benchmark.extra_info["per_tile_cpu_ms"] = benchmark.extra_info["cpu_ms"] / b
    if benchmark.stats is not None:  # None under --benchmark-disable (the CI smoke run)
        benchmark.extra_info["per_tile_ms"] = 1e3 * benchmark.stats.stats.min / b


def test_compile_time(benchmark):
    """First calls with an empty on-disk cache (full JIT compile) and with it populated (load), in fresh
    interpreters; single tile and batch."""
    benchmark.group = "compile"
    code = textwrap.dedent(
        """
        import time, numpy as np
        t0 = time.perf_counter()
        from cellvit_optimus.kernels import hv_to_instances, hv_to_instances_batch, instances_to_hv
        inst = np.zeros((64, 64), np.int32); inst[10:30, 10:30] = 1; inst[30:50, 20:40] = 2
        np_t, hv = instances_to_hv(inst)
        t1 = time.perf_counter()
        hv_to_instances(np_t, hv)
        t2 = time.perf_counter()
        hv_to_instances_batch(np_t[None], hv[None])
        t3 = time.perf_counter()
        hv_to_instances(np_t, hv)
        t4 = time.perf_counter()
        print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
        """
    )

    def run(cache_dir: str) -> list[float]:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return [float(v) for v in out.stdout.split()]

    with tempfile.TemporaryDirectory(prefix="optimus-numba-cache-") as d:
        cold = run(d)  # empty cache: everything compiles
        warm = run(d)  # same directory, now populated: loads
    benchmark.extra_info.update(
        {
            "import_and_targets_compile_s": cold[0],
            "first_call_compile_s": cold[1],
            "first_batch_call_compile_s": cold[2],
            "first_call_cached_s": warm[1],
            "first_batch_call_cached_s": warm[2],
            "second_call_s": cold[3],
        }
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
