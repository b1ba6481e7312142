"""Nuclei as GeoJSON: a QuPath-importable FeatureCollection of detections.

Sits at the output end of the nuclei path (``segment``, and the triage product's slide outputs).
Each nucleus becomes a Feature with a Polygon geometry (its outer contour, counter-clockwise as
RFC 7946 asks) and the properties QuPath (>= 0.4) reads: ``objectType``, ``classification``
(name and colour), ``measurements`` (numbers only), ``metadata`` (strings only), ``isLocked``,
``name``. Anything else in ``properties`` is dropped by QuPath's import, so numbers go to
``measurements`` and strings to ``metadata``. QuPath 0.4 applies ``metadata`` to TMA cores only (its
reader, ``QuPathTypeAdapters`` in v0.4.4, sets it on a ``MetadataStore``, which in 0.4 only a TMA core
is); from 0.5 every object keeps it. So what a 0.4 user must see also goes where 0.4 keeps it (triage
writes the trust tag as the measurement ``trust_level`` and a region's reason in its ``name``)::

    {"type": "Feature", "id": "<uuid5>", "geometry": {...},
     "properties": {"objectType": "detection",
                    "classification": {"name": "epithelial", "color": [0, 0, 255]},
                    "measurements": {"type_prob": 0.91, "area_px": 213.0, "trust_level": 1},
                    "metadata": {"trust": "review"}}}

Ids are UUIDs (QuPath keeps a valid UUID as the object's id and replaces anything else), derived
with uuid5 from the polygon and a namespace, so reruns write identical files. A nucleus without a
class gets no ``classification`` (QuPath's own "unclassified"), not a class of that name.

Coordinates are ``offset + scale * (tile-local x, y)``: pass the tile or ROI origin and the factor to
level-0 pixels so a slide's nuclei land where QuPath draws the slide. QuPath (>= 0.4.0, ``PathIO``)
imports ``.geojson.gz`` as it is.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.io import atomic_write_json

__all__ = ("cells_to_geojson", "clip_ring", "closed_ccw", "coords_feature_json", "feature_id", "polygon_feature",
           "polygon_feature_json", "ring_area_centroid", "write_geojson")

#: decimals kept in coordinates (1/1000 pixel: below any display, keeps files small)
COORD_DECIMALS = 3


def _valid_ring(ring: np.ndarray) -> list[list[float]] | None:
    """A closed, shapely-valid exterior ring as nested lists, or None when nothing valid is left."""
    from shapely.geometry import Polygon
    from shapely.validation import make_valid

    ring = np.round(np.asarray(ring, np.float64), COORD_DECIMALS)
    if ring.shape[0] < 3:
        return None
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    poly = Polygon(ring)
    if not poly.is_valid or poly.area <= 0:
        fixed = make_valid(poly)
        polys = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type == "Polygon" and g.area > 0]
        if not polys:
            return None
        poly = max(polys, key=lambda g: g.area)
        poly = Polygon(np.round(np.asarray(poly.exterior.coords), COORD_DECIMALS))
        if not poly.is_valid or poly.area <= 0:
            return None
    if not poly.exterior.is_ccw:  # GeoJSON (RFC 7946) wants counter-clockwise exteriors
        poly = Polygon(list(poly.exterior.coords)[::-1])
    return [[float(x), float(y)] for x, y in poly.exterior.coords]


def closed_ccw(ring: np.ndarray) -> list[list[float]] | None:
    """close and orient a ring known to be simple (no shapely: cheap, and no GIL churn)"""
    r = np.round(np.asarray(ring, np.float64), COORD_DECIMALS)
    if r.shape[0] < 3:
        return None
    if not np.array_equal(r[0], r[-1]):
        r = np.vstack([r, r[:1]])
    area2 = float(np.dot(r[:-1, 0], r[1:, 1]) - np.dot(r[1:, 0], r[:-1, 1]))
    if area2 == 0.0 or r.shape[0] < 4:
        return None
    return (r if area2 > 0 else r[::-1]).tolist()


def clip_ring(ring: np.ndarray, width: float, height: float) -> np.ndarray | None:
    """``ring`` (K, 2) clipped to the box [0, width] x [0, height]: unchanged when inside (the usual
    case, no shapely), else the largest piece of its intersection with the box; None when nothing
    with an area is left. Tiles at the slide's right and bottom edges reach past it (padding), and
    so can the nuclei and regions found there."""
    r = np.asarray(ring, np.float64)
    if r.size and r.min() >= 0 and r[:, 0].max() <= width and r[:, 1].max() <= height:
        return r
    from shapely.geometry import Polygon, box

    poly = Polygon(r)
    if not poly.is_valid:
        poly = poly.buffer(0)
    cut = poly.intersection(box(0, 0, width, height))
    pieces = [g for g in getattr(cut, "geoms", [cut]) if g.geom_type == "Polygon" and g.area > 0]
    if not pieces:
        return None
    return np.asarray(max(pieces, key=lambda g: g.area).exterior.coords, np.float64)


def ring_area_centroid(coords: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of a closed ring (shoelace); the same numbers from the written
    coordinates and from a file read back"""
    r = np.asarray(coords, np.float64)
    x, y = r[:, 0], r[:, 1]
    cross = x[:-1] * y[1:] - x[1:] * y[:-1]
    a2 = float(cross.sum())
    if a2 == 0.0:
        return 0.0, float(x.mean()), float(y.mean())
    cx = float(((x[:-1] + x[1:]) * cross).sum() / (3.0 * a2))
    cy = float(((y[:-1] + y[1:]) * cross).sum() / (3.0 * a2))
    return abs(a2) / 2.0, cx, cy


def polygon_feature(ring: np.ndarray, class_name: str | None, color: Sequence[int] | None,
                    measurements: Mapping[str, float] | None = None,
                    properties: Mapping[str, Any] | None = None, object_type: str = "detection",
                    validate: bool = True, metadata: Mapping[str, str] | None = None,
                    namespace: uuid.UUID = uuid.NAMESPACE_URL) -> dict | None:
    """One QuPath detection Feature; None if the ring has no valid area.

    ``validate=False`` skips shapely's repair for rings that are simple by construction (the kernels'
    pixel-edge contours); it only closes and orients them. ``metadata`` values become strings.
    """
    coords = _valid_ring(ring) if validate else closed_ccw(ring)
    if coords is None:
        return None
    # the id is derived from the polygon itself: reruns write identical files, and distinct nuclei differ
    fid = str(uuid.uuid5(namespace, repr(coords)))
    return {"type": "Feature", "id": fid, "geometry": {"type": "Polygon", "coordinates": [coords]},
            "properties": _properties(class_name, color, measurements, properties, object_type, metadata)}


_compact = json.JSONEncoder(separators=(",", ":")).encode


def polygon_feature_json(ring: np.ndarray, class_name: str | None, color: Sequence[int] | None,
                         measurements: Mapping[str, float] | None = None,
                         properties: Mapping[str, Any] | None = None, object_type: str = "detection",
                         validate: bool = True, metadata: Mapping[str, str] | None = None,
                         namespace: uuid.UUID = uuid.NAMESPACE_URL) -> str | None:
    """:func:`polygon_feature` as compact JSON text, byte for byte ``json.dumps(polygon_feature(...),
    separators=(",", ":"))``; None if the ring has no valid area.

    About 1.7x faster for writers of many features: each coordinate is formatted once (the id hashes
    that text, spaced as ``repr`` spaces it) and no feature dict is built. In a worker thread this is
    pure-Python, GIL-holding time, which a host application's event loop waits behind.
    """
    coords = _valid_ring(ring) if validate else closed_ccw(ring)
    if coords is None:
        return None
    return coords_feature_json(coords, class_name, color, measurements, properties, object_type, metadata,
                               namespace)


def feature_id(coords: list[list[float]], namespace: uuid.UUID = uuid.NAMESPACE_URL,
               text: str | None = None) -> str:
    """the feature's UUID: uuid5 of its ring's ``repr`` in ``namespace`` (``text``: the ring's compact
    JSON when already made, which spares formatting the coordinates twice)"""
    text = _compact(coords) if text is None else text
    # compact JSON of finite floats, with ", " for ",", is repr(coords); JSON spells NaN/inf otherwise
    name = repr(coords) if "N" in text or "I" in text else text.replace(",", ", ")
    return str(uuid.uuid5(namespace, name))


def coords_feature_json(coords: list[list[float]], class_name: str | None, color: Sequence[int] | None,
                        measurements: Mapping[str, float] | None = None,
                        properties: Mapping[str, Any] | None = None, object_type: str = "detection",
                        metadata: Mapping[str, str] | None = None,
                        namespace: uuid.UUID = uuid.NAMESPACE_URL, fid: str | None = None) -> str:
    """the feature text of an already closed, oriented and rounded ring (see :func:`polygon_feature_json`;
    ``fid``: its :func:`feature_id`, when the caller has it already)"""
    text = _compact(coords)
    fid = fid or feature_id(coords, namespace, text)
    props = _properties(class_name, color, measurements, properties, object_type, metadata)
    return ('{"type":"Feature","id":"' + fid + '","geometry":{"type":"Polygon","coordinates":[' + text
            + ']},"properties":' + _compact(props) + "}")


def _properties(class_name: str | None, color: Sequence[int] | None, measurements: Mapping[str, float] | None,
                properties: Mapping[str, Any] | None, object_type: str,
                metadata: Mapping[str, str] | None = None) -> JsonDict:
    props: JsonDict = {"objectType": object_type}
    if class_name is not None:
        props["classification"] = {"name": class_name, "color": [int(c) for c in (color or (255, 0, 0))]}
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()}
    if metadata:
        props["metadata"] = {k: str(v) for k, v in metadata.items()}
    if properties:
        props.update(properties)
    return props


def cells_to_geojson(
    instances_table: Any,
    profile: Any | None,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    extra_properties: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    mpp: float | None = None,
) -> JsonDict:
    """A FeatureCollection of the nuclei in a ``kernels.InstanceTable``.

    Parameters
    ----------
    instances_table : InstanceTable
        Contours, types and type probabilities (e.g. ``SegmentResult.table``).
    profile : ClassProfile, optional
        Names and colours of the types; None leaves nuclei unclassified.
    offset : (x, y)
        Added to every coordinate after scaling (tile / ROI origin in the output frame).
    scale : float
        Multiplies the table's coordinates (e.g. 2.0 from a 0.25 MPP nuclei grid to a 0.5 MPP level 0).
    extra_properties : mapping, or one mapping per nucleus
        Added to every Feature (e.g. ``{"slide": ...}``), or per nucleus: numbers to its measurements,
        anything else, as text, to its metadata (the two places QuPath keeps).
    mpp : float, optional
        Microns per output pixel; adds ``area_um2`` to the measurements.

    Nuclei whose contour has no valid area are left out (their count is in the collection's
    ``properties.dropped``).
    """
    t = instances_table
    n = len(t)
    per_cell = isinstance(extra_properties, Sequence) and not isinstance(extra_properties, Mapping)
    if per_cell and len(extra_properties) != n:  # type: ignore[arg-type]
        raise ValueError(f"extra_properties: {len(extra_properties)} entries for {n} nuclei")  # type: ignore[arg-type]
    ox, oy = float(offset[0]), float(offset[1])
    feats = []
    dropped = 0
    for i in range(n):
        ring = np.asarray(t.contours[i], np.float64) * float(scale) + np.array([ox, oy])
        tid = int(t.types[i])
        name = color = None
        if profile is not None and 0 < tid <= profile.num_classes:
            name, color = profile.label(tid), profile.color(tid)
        area = float(t.areas[i]) * float(scale) ** 2
        meas: dict[str, float] = {"area_px": area, "type_prob": float(t.type_probs[i])}
        if mpp is not None:
            meas["area_um2"] = area * float(mpp) ** 2
        if t.type_scores is not None and profile is not None:
            for c in range(1, min(profile.num_classes, t.type_scores.shape[1] - 1) + 1):
                meas[f"prob_{profile.label(c)}"] = float(t.type_scores[i, c])
        meta: dict[str, str] = {}
        if extra_properties is not None:
            extra = extra_properties[i] if per_cell else extra_properties  # type: ignore[index]
            for k, v in extra.items():  # type: ignore[union-attr]
                if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                    meas[k] = float(v)
                else:
                    meta[k] = str(v)
        f = polygon_feature(ring, name, color, meas, metadata=meta or None)
        if f is None:
            dropped += 1
            continue
        feats.append(f)
    return {"type": "FeatureCollection", "features": feats, "properties": {"dropped": dropped}}


def write_geojson(path: str | os.PathLike[str], collection: Mapping[str, Any]) -> None:
    """Write a FeatureCollection atomically (compact JSON)."""
    atomic_write_json(path, collection, indent=None)
