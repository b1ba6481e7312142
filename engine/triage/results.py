"""What a triage run returns: one :class:`SlideResult` per finished slide and the :class:`BatchResult`
of a whole batch (results, failures, skipped inputs and the worklist files)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.triage.cells import CellTable
from cellvit_optimus.engine.wsi.inspect import Failure

__all__ = ("SlideResult", "BatchResult", "PrioritySource")

#: where a slide's priority came from: the MIL head, or the fallback density rule (:mod:`.finalise`)
PrioritySource = Literal["mil", "fallback"]


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
    #: the nuclei written to cells.geojson, in memory (None for a slide reused from an earlier run,
    #: or passed between processes: :meth:`cell_table` then reads the file)
    cells: CellTable | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """plain-JSON fields (everything but the in-memory cells)"""
        d = asdict(replace(self, cells=None))
        d.pop("cells")
        return d

    def cell_table(self) -> CellTable:
        """the slide's nuclei as a :class:`CellTable`: in memory when this run computed them, else
        read from the slide's cells GeoJSON"""
        if self.cells is not None:
            return self.cells
        path = self.outputs.get("cells")
        if not path:
            raise ConfigError(f"{self.name}: no cells in memory and no cells output written (outputs="
                              f"{sorted(self.outputs)})")
        return CellTable.from_geojson(path)


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
