"""Small helpers shared by the benchmarks: throughput keys in ``extra_info`` and disabled-mode sizing.

Every benchmark records its rate under the same keys so that tables and compare runs line up:
``tiles_per_s``, ``mp_per_s`` (megapixels per second), ``nuclei_per_s`` and, for the backbone,
``flops_fraction``. Under ``--benchmark-disable`` (the CI smoke run) the function runs once and there
are no statistics: nothing is recorded and inputs are scaled down with :func:`smoke`.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ("gpu_batches", "record", "smoke")


def gpu_batches(default: tuple[int, ...]) -> tuple[int, ...]:
    """the GPU backbone benches' batch sizes: ``default``, or ``OPTIMUS_BENCH_GPU_BATCHES`` ("64,256"),
    which bench/gpu_check.sh sets to trim the suite to its time slot"""
    raw = os.environ.get("OPTIMUS_BENCH_GPU_BATCHES", "").strip()
    if not raw:
        return default
    try:
        sizes = tuple(int(v) for v in raw.split(","))
    except ValueError as exc:
        raise ValueError(f"OPTIMUS_BENCH_GPU_BATCHES={raw!r}: expected comma-separated integers") from exc
    if not sizes or min(sizes) < 1:
        raise ValueError(f"OPTIMUS_BENCH_GPU_BATCHES={raw!r}: batch sizes must be >= 1")
    return sizes


def smoke(benchmark: Any, full: int, small: int) -> int:
    """``small`` under ``--benchmark-disable`` (CI smoke), ``full`` otherwise"""
    return small if benchmark.disabled else full


def record(benchmark: Any, **amounts: float) -> float | None:
    """store ``<unit>_per_s = amount / mean round time`` for each ``<unit>=amount`` (tiles, mp, nuclei);
    returns the mean round time in seconds (None when disabled)"""
    if benchmark.stats is None:
        return None
    mean = float(benchmark.stats.stats.mean)
    for unit, amount in amounts.items():
        benchmark.extra_info[f"{unit}_per_s"] = round(amount / mean, 3)
        benchmark.extra_info[unit] = amount
    return mean


def record_ratio(benchmark: Any, means: dict[str, float], label: str, mean: float | None, baseline: str,
                 key: str) -> None:
    """keep ``mean`` (a :func:`record` result) as ``means[label]``; when ``label`` is not ``baseline`` and the
    baseline ran earlier in this session, store ``extra_info[key] = mean / baseline mean`` (3 decimals):
    the side-by-side ratio these benchmarks report"""
    if mean is None:
        return
    means[label] = mean
    if label != baseline and baseline in means:
        benchmark.extra_info[key] = round(mean / means[baseline], 3)

