"""Small helpers shared by the benchmarks: throughput keys in ``extra_info`` and disabled-mode sizing.

Every benchmark records its rate under the same keys so that tables and compare runs line up:
``tiles_per_s``, ``mp_per_s`` (megapixels per second), ``nuclei_per_s`` and, for the backbone,
``flops_fraction``. Under ``--benchmark-disable`` (the CI smoke run) the function runs once and there
are no statistics: nothing is recorded and inputs are scaled down with :func:`smoke`.
"""

from __future__ import annotations

from typing import Any

__all__ = ("record", "smoke")


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
