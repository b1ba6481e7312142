"""Slide inspection: open, describe, detect tissue and count tiles, for one slide or a batch.

A batch never stops on a bad slide: each input gives either a :class:`SlideReport` or a
:class:`Failure` naming the file, the error type and the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellvit_optimus.engine.errors import OptimusError, SlideError
from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.wsi.slide import BackendName, open_slide
from cellvit_optimus.engine.wsi.tissue import TilingConfig, TissueConfig, detect_tissue, draw_overlay, tile_grid

__all__ = ("Failure", "SlideReport", "inspect_slide", "inspect_many", "failure_from")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """one input that could not be processed, and why"""

    path: str
    error: str  # exception class name
    reason: str  # short category: "not found", "not a slide", "no MPP", ...
    message: str  # full message (names the file)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def failure_from(path: str | os.PathLike[str], exc: BaseException) -> Failure:
    reason = getattr(exc, "reason", None) or "unexpected error"
    message = str(exc) or type(exc).__name__
    if str(path) not in message:  # a backend's own error rarely names the file; a worklist row must
        message = f"{path}: {message}"
    return Failure(path=str(path), error=type(exc).__name__, reason=reason, message=message)


@dataclass
class SlideReport:
    """facts about one slide and its tissue tiles at the target resolution"""

    path: str
    backend: str
    vendor: str | None
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: list[list[int]]
    level_downsamples: list[float]
    mpp: tuple[float, float] | None
    mpp_source: str
    associated_images: list[str]
    target_mpp: float
    tile_size: int
    tissue_tiles: int
    tissue_fraction: float
    thumbnail_path: str | None = None
    extras: JsonDict = field(default_factory=dict)

    def to_dict(self) -> JsonDict:
        d = asdict(self)
        d["dimensions"] = list(self.dimensions)
        d["mpp"] = list(self.mpp) if self.mpp else None
        return d


def inspect_slide(path: str | os.PathLike[str], *, mpp: float | None = None, backend: BackendName = "auto",
                  tiling: TilingConfig | None = None, tissue: TissueConfig | None = None,
                  thumbnail_dir: str | os.PathLike[str] | None = None) -> SlideReport:
    """open ``path``, detect tissue and count the kept tiles; optionally write an overlay PNG

    Raises the :class:`SlideError` subclass that says what is wrong with the file.
    """
    tiling = tiling or TilingConfig()
    with open_slide(path, backend=backend, mpp=mpp) as slide:
        mask = detect_tissue(slide, tissue)
        grid = tile_grid(slide, tiling, mask=mask)
        thumb_path = None
        if thumbnail_dir is not None:
            from cellvit_optimus.engine.io import atomic_write_png

            out = Path(thumbnail_dir) / f"{Path(path).name}.tissue.png"
            atomic_write_png(out, draw_overlay(mask, grid))
            thumb_path = str(out)
        return SlideReport(path=str(path), backend=slide.backend, vendor=slide.vendor,
                           dimensions=slide.dimensions, level_count=slide.level_count,
                           level_dimensions=[list(d) for d in slide.level_dimensions],
                           level_downsamples=[round(d, 4) for d in slide.level_downsamples], mpp=slide.mpp,
                           mpp_source=slide.mpp_source, associated_images=sorted(slide.associated_images),
                           target_mpp=tiling.target_mpp, tile_size=tiling.tile_size,
                           tissue_tiles=len(grid), tissue_fraction=mask.tissue_fraction,
                           thumbnail_path=thumb_path)


def inspect_many(paths: Sequence[str | os.PathLike[str]], **kwargs: Any) -> Iterator[SlideReport | Failure]:
    """:func:`inspect_slide` over many slides; a bad slide yields a :class:`Failure` and the batch goes on"""
    for p in paths:
        try:
            yield inspect_slide(p, **kwargs)
        except (SlideError, OptimusError) as exc:
            log.info("%s", exc)  # the Failure carries the message; callers print it once
            yield failure_from(p, exc)
        except Exception as exc:  # a backend bug must not stop the batch either
            log.exception("unexpected error on %s", p)
            yield failure_from(p, exc)
