"""What a triage run returns: one :class:`SlideResult` per finished slide and the :class:`BatchResult`
of a whole batch (results, failures, skipped inputs and the worklist files)."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.triage.cells import CellTable
from cellvit_optimus.engine.wsi import Failure

__all__ = ("SlideResult", "BatchResult", "PrioritySource")

#: where a slide's priority came from: the MIL head, or the fallback density rule (:mod:`.finalise`)
PrioritySource = Literal["mil", "fallback"]


class _LazyCells:
    """the ``cells`` field of :class:`SlideResult`: what was passed in, else the slide's cells GeoJSON read
    on first access (so that a slide reused from an earlier run behaves like a computed one)"""

    def __get__(self, obj: Any, objtype: Any = None) -> CellTable | None:
        if obj is None:  # the dataclass asks for the field's default
            return None
        cells = obj.__dict__.get("_cells")
        if cells is None:
            path = obj.outputs.get("cells")
            if path and os.path.isfile(path):
                cells = obj.__dict__["_cells"] = CellTable.from_geojson(path)
        return cells

    def __set__(self, obj: Any, value: CellTable | None) -> None:
        # the dataclass passes this descriptor itself as the default: no cells given
        obj.__dict__["_cells"] = None if isinstance(value, _LazyCells) else value


@dataclass
class SlideResult:
    """a triaged slide"""

    path: str
    name: str
    tag: str
    reason: str
    priority: float
    priority_source: PrioritySource
    tiles: int
    nuclei: int
    counts: dict[str, int]
    tag_fractions: dict[str, float]
    outputs: dict[str, str]
    timings: dict[str, float]
    cached: bool = False
    #: the nuclei written to cells.geojson: in memory when this run computed them, else (a slide reused
    #: from an earlier run, or a result passed between processes) read from that file on first access;
    #: None only when no cells output was written
    cells: CellTable | None = field(default=_LazyCells(),  # type: ignore[assignment]
                                   repr=False, compare=False)

    def to_dict(self) -> JsonDict:
        """plain-JSON fields (everything but the cells)"""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "cells"}

    def cell_table(self) -> CellTable:
        """the slide's nuclei as a :class:`CellTable` (:attr:`cells`); ConfigError when none were written"""
        if self.cells is None:
            raise ConfigError(f"{self.name}: no cells in memory and no cells output written (outputs="
                              f"{sorted(self.outputs)})")
        return self.cells


@dataclass
class BatchResult:
    """a whole batch: results in input order, failures with reasons, and the worklist files"""

    results: list[SlideResult]
    failures: list[Failure]
    worklist_csv: str
    worklist_json: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (folder entry, why it was not run)

    @property
    def status(self) -> str:
        if not self.failures:
            return "complete"
        return "partial" if self.results else "failed"
