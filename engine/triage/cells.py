"""A slide's nuclei in memory: one typed table of numpy columns, the library's view of cells.geojson.

:class:`CellTable` is what the triage engine hands back with each slide result
(``SlideResult.cells``), built from exactly the nuclei written to ``cells.geojson`` (same order, same
ids, same polygons), and what :meth:`CellTable.from_geojson` reads back from such a file (plain or
gzip). :meth:`CellTable.to_geodataframe` needs geopandas, imported only when called.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.errors import BackendUnavailableError, ConfigError
from cellvit_optimus.engine.jsondoc import JsonDict

__all__ = ("CellTable", "UNCLASSIFIED")

#: the name nuclei without a type are counted under (they carry no QuPath classification)
UNCLASSIFIED = "unclassified"


@dataclass(frozen=True)
class CellTable:
    """nuclei of one slide as columns (N rows each); coordinates in level-0 pixels

    Columns: ``id`` (the feature's UUID in cells.geojson), ``centroid_x`` / ``centroid_y`` and
    ``area_px`` (of the written polygon), ``type_id`` (0 when unclassified), ``type_name``,
    ``type_prob``, ``trust`` (the trust tag of the nucleus' tile), ``type_set_size`` (size of the
    conformal type set; -1 without a calibration state), and ``contours`` (one closed (K, 2) ring per
    nucleus).
    """

    id: np.ndarray
    centroid_x: np.ndarray
    centroid_y: np.ndarray
    area_px: np.ndarray
    type_id: np.ndarray
    type_name: np.ndarray
    type_prob: np.ndarray
    trust: np.ndarray
    type_set_size: np.ndarray
    contours: list[np.ndarray] = field(repr=False)

    def __post_init__(self) -> None:
        n = len(self.id)
        for name in ("centroid_x", "centroid_y", "area_px", "type_id", "type_name", "type_prob", "trust",
                     "type_set_size", "contours"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"CellTable: column {name} has {len(getattr(self, name))} rows, id has {n}")

    def __len__(self) -> int:
        return len(self.id)

    def __repr__(self) -> str:
        return f"CellTable({len(self)} nuclei, types {self.counts()})"

    def counts(self) -> dict[str, int]:
        """nuclei per type name"""
        names, n = np.unique(self.type_name, return_counts=True)
        return {str(k): int(v) for k, v in zip(names, n)}

    @classmethod
    def from_columns(cls, *, ids: Any, contours: list[np.ndarray], type_id: Any, type_name: Any, type_prob: Any,
                     trust: Any, type_set_size: Any, area: Any, centroid_x: Any, centroid_y: Any) -> CellTable:
        """a table from sequences or arrays, converted to the columns' dtypes"""
        return cls(id=np.asarray(ids, dtype="U36"), centroid_x=np.asarray(centroid_x, np.float64),
                   centroid_y=np.asarray(centroid_y, np.float64), area_px=np.asarray(area, np.float64),
                   type_id=np.asarray(type_id, np.int16), type_name=np.asarray(type_name, dtype=str),
                   type_prob=np.asarray(type_prob, np.float32), trust=np.asarray(trust, dtype=str),
                   type_set_size=np.asarray(type_set_size, np.int16), contours=contours)

    @classmethod
    def from_geojson(cls, path: str | os.PathLike[str],
                     type_ids: dict[str, int] | None = None) -> CellTable:
        """read a triage ``cells.geojson`` (or ``.geojson.gz``) back; ``type_ids`` maps class names
        to type ids (without it, ids are -1 for classified and 0 for unclassified nuclei)"""
        from cellvit_optimus.engine.geojson import ring_area_centroid

        p = Path(path)
        try:
            raw = p.read_bytes()
            doc = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{p}: not a readable GeoJSON cells file ({exc})") from exc
        feats = doc.get("features") if isinstance(doc, dict) else None
        if not isinstance(feats, list):
            raise ConfigError(f"{p}: no FeatureCollection features list")
        ids, contours, tid, tname, prob, trust, sizes = [], [], [], [], [], [], []
        ac: list[tuple[float, float, float]] = []
        for f in feats:
            props: JsonDict = f.get("properties", {})
            ring = f["geometry"]["coordinates"][0]
            name = props.get("classification", {}).get("name")
            meas, meta = props.get("measurements", {}), props.get("metadata", {})
            ids.append(f.get("id", ""))
            contours.append(np.asarray(ring, np.float64))
            tname.append(name or UNCLASSIFIED)
            tid.append(0 if name is None else (type_ids or {}).get(name, -1))
            prob.append(float(meas.get("type_prob", np.nan)))
            trust.append(str(meta.get("trust", "")))
            sizes.append(int(meas.get("type_set_size", -1)))
            ac.append(ring_area_centroid(ring))
        a = np.asarray(ac, np.float64).reshape(-1, 3)
        return cls.from_columns(ids=ids, contours=contours, type_id=tid, type_name=tname, type_prob=prob,
                                trust=trust, type_set_size=sizes, area=a[:, 0], centroid_x=a[:, 1],
                                centroid_y=a[:, 2])

    def to_geodataframe(self) -> Any:
        """the table as a geopandas GeoDataFrame (one Polygon per nucleus, index = feature id)"""
        try:
            import geopandas as gpd
            from shapely.geometry import Polygon
        except ImportError as exc:
            raise BackendUnavailableError(
                "CellTable.to_geodataframe needs geopandas, which is not installed: pip install geopandas "
                "(the columns themselves need nothing extra)") from exc
        data = {"centroid_x": self.centroid_x, "centroid_y": self.centroid_y, "area_px": self.area_px,
                "type_id": self.type_id, "type_name": self.type_name, "type_prob": self.type_prob,
                "trust": self.trust, "type_set_size": self.type_set_size}
        return gpd.GeoDataFrame(data, geometry=[Polygon(c) for c in self.contours],
                                index=gpd.pd.Index(self.id, name="id"))
