"""HV post-processing: Numba kernel vs the scipy/skimage reference on real maps, side by side.

Inputs are real: NP/HV targets of MoNuSeg image TCGA-AR-A1AK (1000x1000, padded to 1024 with
background) made model-like (blurred, noisy), and a 256 px crop of it. Groups ``hv-256`` and
``hv-1024`` put the kernel and the reference next to each other; ``*-map`` variants skip the
per-instance table (the reference's Python loop), ``compile`` times the first call of freshly
compiled kernels (cache disabled) in a subprocess and records it in ``extra_info``.

Run: ``pytest bench/test_bench_kernels.py --benchmark-only``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from reference_hovernet import noisy_maps, reference_hv_to_instances, reference_instance_map

from cellvit_optimus.engine.datasets import load_monuseg
from cellvit_optimus.kernels import hv_to_instances, instances_to_hv


@pytest.fixture(scope="module")
def maps(nuclei_dir):
    s = [x for x in load_monuseg(nuclei_dir) if "A1AK" in x.name][0]
    gt = np.pad(s.inst_map, 12)
    np_t, hv = instances_to_hv(gt)
    np_t, hv = noisy_maps(np_t, hv, seed=0)
    out = {1024: (np_t, hv), 256: (np.ascontiguousarray(np_t[300:556, 300:556]), np.ascontiguousarray(hv[:, 300:556, 300:556]))}
    for p, h in out.values():  # warm the kernels (compile or load from cache) outside the timings
        hv_to_instances(p, h)
    return out


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("impl", ["numba", "reference"])
def test_hv_full(benchmark, maps, size, impl):
    benchmark.group = f"hv-{size}"
    p, h = maps[size]
    fn = (lambda: hv_to_instances(p, h)) if impl == "numba" else (lambda: reference_hv_to_instances(p, h))
    inst, _ = benchmark.pedantic(fn, rounds=5 if size == 1024 else 20, iterations=1, warmup_rounds=1)
    benchmark.extra_info["instances"] = int(inst.max())


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("impl", ["numba", "reference"])
def test_hv_map_only(benchmark, maps, size, impl):
    benchmark.group = f"hv-{size}-map"
    p, h = maps[size]
    fn = (lambda: hv_to_instances(p, h, with_table=False)) if impl == "numba" else (lambda: reference_instance_map(p, h))
    benchmark.pedantic(fn, rounds=5 if size == 1024 else 20, iterations=1, warmup_rounds=1)


def test_compile_time(benchmark):
    """First call with the on-disk cache off (full JIT compile) and with it on (load), in fresh interpreters."""
    benchmark.group = "compile"
    code = textwrap.dedent(
        """
        import time, numpy as np
        t0 = time.perf_counter()
        from cellvit_optimus.kernels import hv_to_instances, instances_to_hv
        inst = np.zeros((64, 64), np.int32); inst[10:30, 10:30] = 1; inst[30:50, 20:40] = 2
        np_t, hv = instances_to_hv(inst)
        t1 = time.perf_counter()
        hv_to_instances(np_t, hv)
        t2 = time.perf_counter()
        hv_to_instances(np_t, hv)
        t3 = time.perf_counter()
        print(t1 - t0, t2 - t1, t3 - t2)
        """
    )

    def run(disable_cache: bool) -> list[float]:
        env = dict(os.environ)
        if disable_cache:
            env["NUMBA_DISABLE_JIT"] = "0"
            env["NUMBA_CACHE_DIR"] = "/tmp/optimus-bench-nocache-%d" % time.time_ns()
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return [float(v) for v in out.stdout.split()]

    cold = run(True)
    warm = run(False)
    benchmark.extra_info.update(
        {
            "import_and_targets_compile_s": cold[0],
            "first_call_compile_s": cold[1],
            "first_call_cached_s": warm[1],
            "second_call_s": cold[2],
        }
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
