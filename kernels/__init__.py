"""numpy + Numba kernels: HV instance post-processing, training targets, stitching and metrics (no torch).

Names are loaded lazily (PEP 562) so that ``import cellvit_optimus.kernels`` stays cheap and numba is
imported only when a kernel is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__: tuple[str, ...] = (
    # HV post-processing and targets
    "InstanceTable",
    "hv_to_instances",
    "hv_to_instances_batch",
    "instance_table",
    "instances_to_hv",
    "sobel_range",
    # slide tiles
    "jpeg_scan_check",
    # outlines
    "smooth_ring",
    # stitching
    "TileInstances",
    "stitch_tiles",
    # metrics
    "DetectionScores",
    "PQResult",
    "aji",
    "aji_plus",
    "bpq",
    "detection_scores",
    "dice",
    "instance_types",
    "match_instances",
    "mpq",
    "pair_centroids",
    "pq",
    # start-up
    "kernels_cached",
)

_WHERE: dict[str, str] = {
    "InstanceTable": "hovernet",
    "hv_to_instances": "hovernet",
    "hv_to_instances_batch": "hovernet",
    "instance_table": "hovernet",
    "sobel_range": "hovernet",
    "instances_to_hv": "targets",
    "jpeg_scan_check": "jpeg",
    "smooth_ring": "contours",
    "TileInstances": "stitch",
    "stitch_tiles": "stitch",
    **{
        n: "metrics"
        for n in (
            "DetectionScores",
            "PQResult",
            "aji",
            "aji_plus",
            "bpq",
            "detection_scores",
            "dice",
            "instance_types",
            "match_instances",
            "mpq",
            "pair_centroids",
            "pq",
        )
    },
}

if TYPE_CHECKING:  # pragma: no cover - static re-exports for type checkers
    from .hovernet import InstanceTable, hv_to_instances, hv_to_instances_batch, instance_table, sobel_range
    from .contours import smooth_ring
    from .jpeg import jpeg_scan_check
    from .metrics import (
        DetectionScores,
        PQResult,
        aji,
        aji_plus,
        bpq,
        detection_scores,
        dice,
        instance_types,
        match_instances,
        mpq,
        pair_centroids,
        pq,
    )
    from .stitch import TileInstances, stitch_tiles
    from .targets import instances_to_hv


def kernels_cached() -> bool | None:
    """whether the kernels a triage run needs (HV post-processing, the JPEG walk) are in Numba's on-disk
    cache, so that this process loads them (about a second) instead of compiling them (minutes on a small
    CPU, once per install); None when Numba's cache cannot be inspected (the caller then says nothing)

    Reads Numba's cache index files (private API, hence the None); imports numba and the kernel modules,
    compiles nothing."""
    try:
        from numba.core.registry import CPUDispatcher

        from . import _hvpipe, jpeg

        for mod in (_hvpipe, jpeg):
            kernels = [k for k in vars(mod).values()
                       if isinstance(k, CPUDispatcher) and k.__module__ == mod.__name__]
            # a stale index (the source changed) loads as empty: those kernels compile again
            if not any(k._cache._cache_file._load_index() for k in kernels):
                return False
        return True
    except Exception:  # noqa: BLE001  another Numba's internals
        return None


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
