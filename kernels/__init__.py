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


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
