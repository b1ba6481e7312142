"""The per-slide and per-batch files of a triage run, and the rule that says a slide is finished.

Where it sits: :mod:`.finalise` computes a slide's tags and priority and calls these writers; the
:class:`~.engine.Engine` and the Ray driver (:mod:`.distributed`) both write the batch worklist with
:func:`write_worklist` and both skip finished slides with :func:`finished_result`.

- cells (:func:`cells_output`): every nucleus as a QuPath detection, streamed to text as it is built;
- regions (:func:`regions_geojson`): one locked annotation per 8-connected group of tiles;
- overview (:func:`overview_image`): tissue, nuclei density (or MIL attention) and trust tags;
- the worklist (:func:`write_worklist`): slides ranked by priority, failures and skipped inputs.

A finished slide's ``summary.json`` records the size and SHA-256 of every file it delivers (its
``checksums``, keyed by output, paths relative to the output folder); :func:`finished_result` trusts a
summary only when each of them still matches, and a slide that fails has whatever earlier outputs it
had moved aside (:func:`retire_outputs`), so nothing damaged or stale is ever taken for finished.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.io import (atomic_write_bytes, atomic_write_json, digest_problem, escape_path,
                                      move_aside, output_names)
from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.triage.cells import UNCLASSIFIED, CellTable
from cellvit_optimus.engine.triage.consumer import NucleiRecords
from cellvit_optimus.engine.triage.results import BatchResult, SlideResult
from cellvit_optimus.engine.wsi import Failure, draw_overlay

__all__ = ("TAG_COLOURS", "GilHandOff", "cells_output", "regions_geojson", "overview_image", "write_worklist",
           "finished_result", "output_owner", "retire_outputs", "SLIDE_FILES")

log = logging.getLogger(__name__)

#: classification colour of each trust tag (regions, overview)
TAG_COLOURS = {"reliable": (40, 170, 60), "review": (240, 170, 20), "out_of_domain": (220, 40, 40)}
#: the trust tag as a number, the measurement ``trust_level`` of cells and regions: QuPath 0.4 keeps
#: measurements but drops ``metadata`` outside TMA cores (its GeoJSON reader, v0.4.4), so the tag must
#: also travel as a number there (ordered by severity: sort or threshold it in the measurement table)
TRUST_LEVELS = {"reliable": 0, "review": 1, "out_of_domain": 2}

_RESULT_FIELDS = {"path": str, "name": str, "tag": str, "reason": str, "priority": (int, float),
                  "priority_source": str, "tiles": int, "nuclei": int, "counts": dict, "tag_fractions": dict,
                  "outputs": dict, "timings": dict}


def _summary_problem(doc: Any) -> str | None:
    """what makes a parsed summary.json unusable, or None"""
    if not isinstance(doc, dict):
        return f"summary is a JSON {type(doc).__name__}, not an object"
    if not isinstance(doc.get("run_key"), str):
        return "summary has no run key"
    result = doc.get("result")
    if not isinstance(result, dict):
        return "summary has no result"
    for k, t in _RESULT_FIELDS.items():
        if not isinstance(result.get(k), t):
            return f"summary result field {k!r} missing or of the wrong type"
    if set(result) - set(_RESULT_FIELDS):
        return f"summary result has unknown fields {sorted(set(result) - set(_RESULT_FIELDS))}"
    return None


def finished_result(summary: Path, slide: Path, key: str | None, fingerprint: str) -> JsonDict | None:
    """the resume rule: the recorded result when ``summary`` says this slide file (path and fingerprint)
    was finished under run ``key`` and every file it delivered still matches the checksum recorded
    when it was written, else None. A summary that cannot be read or is malformed is moved aside
    (warning naming it) so the slide is recomputed; one for another key, path or slide content is
    simply overwritten by the recomputation; an output that is missing, cut or altered is named,
    moved aside and the slide recomputed (as is a summary of an earlier version, which records no
    checksums)."""
    try:
        text = summary.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        move_aside(summary, f"unreadable summary ({exc.strerror or exc})")
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        move_aside(summary, f"summary is not valid JSON ({exc})")
        return None
    problem = _summary_problem(doc)
    if problem is not None:
        move_aside(summary, problem)
        return None
    if doc["run_key"] != key or Path(doc["result"]["path"]) != slide:
        return None
    if doc.get("slide_fingerprint") != fingerprint:
        log.warning("%s: %s changed since this summary was written (size, mtime or content); recomputing",
                    summary, escape_path(slide))
        return None
    checks = doc.get("checksums")
    if not isinstance(checks, dict) or not checks:
        log.warning("%s: records no checksums of the files it delivered (an earlier version wrote it); "
                    "recomputing the slide", summary)
        return None
    out = summary.parent.parent
    for kind, want in sorted(checks.items()):
        rel = want.get("file") if isinstance(want, dict) else None
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            move_aside(summary, f"summary records no usable file for its {kind!r} checksum")
            return None
        problem = digest_problem(out / rel, want)
        if problem is not None:
            if problem == "missing":
                log.warning("%s: missing, though %s lists it; recomputing the slide", out / rel, summary)
            else:
                move_aside(out / rel, f"damaged ({problem})", then=f"recomputing {escape_path(slide.name)}")
            return None
    return doc["result"]


#: the files a slide's output folder holds, besides temporaries and what was moved aside
SLIDE_FILES = ("summary.json", "cells.geojson", "cells.geojson.gz", "regions.geojson", "overview.png")


def output_owner(out: Path, name: str) -> str | None:
    """the slide path whose outputs ``out/name`` (and ``out/features/name.h5``) hold: what its
    summary.json records, else its feature file; None when there are none or they do not say"""
    from cellvit_optimus.engine.pipeline import feature_owner

    try:
        doc = json.loads((out / name / "summary.json").read_bytes())
        path = doc["result"]["path"]
        if isinstance(path, str) and path:
            return path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return feature_owner(out / "features" / f"{name}.h5")


def retire_outputs(out: Path, name: str, slide: str, keep_features_key: str | None = None) -> list[Path]:
    """a slide failed: move aside (``<file>.stale-<time>``, warning naming each) every output under its
    name, so that nothing of an earlier run (or of this one, before it failed) looks current. Its feature
    file stays only when it was written for this slide as it is now (cache key ``keep_features_key``).
    Returns the new paths. Never raises: the slide is reported as failed either way and a batch never
    stops over this (a warning says what could not be moved)."""
    moved: list[Path] = []
    try:
        _move_outputs_aside(out, name, slide, keep_features_key, moved)
    except Exception as exc:
        log.warning("%s: could not move its earlier outputs aside: %s", escape_path(slide), exc)
    return moved


def _move_outputs_aside(out: Path, name: str, slide: str, keep_features_key: str | None,
                        moved: list[Path]) -> None:
    import h5py

    why = f"left from an earlier run; {escape_path(slide)} failed in this one"
    for f in SLIDE_FILES:
        p = out / name / f
        if p.exists():
            dest = move_aside(p, why, kind="stale", then="the slide is listed as failed")
            if dest is not None:
                moved.append(dest)
    h5 = out / "features" / f"{name}.h5"
    if h5.exists():
        key = None
        try:
            with h5py.File(h5, "r") as f:
                key = f.attrs.get("cache_key")
        except OSError:
            pass
        if keep_features_key is None or key != keep_features_key:
            dest = move_aside(h5, why, kind="stale", then="the slide is listed as failed")
            if dest is not None:
                moved.append(dest)


#: a long pure-Python loop in a worker thread pauses this long every HAND_OFF_EVERY_S (see GilHandOff)
HAND_OFF_EVERY_S = 0.002
HAND_OFF_PAUSE_S = 0.0002


class GilHandOff:
    """call once per step of a long pure-Python loop run in a worker thread: every ``every_s`` of work
    it sleeps ``pause_s``, releasing the GIL with this thread off the CPU, so a thread waiting for the
    GIL (a host application's event loop) takes it at once. CPython's own hand-off (a drop request
    after the 5 ms switch interval) was not enough: beside the cells GeoJSON loop a 10 ms heartbeat
    was late by more than 80 ms in 5 of 22 runs (up to 187 ms); with these pauses by at most 22 ms
    in 18 runs, 70 ms in 11 more with a CPU-bound process competing for the 2 cores (issue 8).
    Costs ``pause_s / every_s`` (10 %) of the loop's time."""

    def __init__(self, every_s: float = HAND_OFF_EVERY_S, pause_s: float = HAND_OFF_PAUSE_S) -> None:
        self.every_s, self.pause_s = every_s, pause_s
        self.due = time.perf_counter() + every_s

    def __call__(self) -> None:
        if time.perf_counter() >= self.due:
            time.sleep(self.pause_s)
            self.due = time.perf_counter() + self.every_s


def cells_output(records: NucleiRecords, profile: Any, tile_tags: list[str], set_sizes: np.ndarray | None,
           slide_dimensions: tuple[int, int], namespace: uuid.UUID,
           as_text: bool = True) -> tuple[CellTable, list[str]]:
    """the nuclei as written: a :class:`CellTable` and (``as_text``) each one's QuPath feature text
    (see :mod:`.geojson`): classification = type (none when unclassified), measurements = type
    probability, area, conformal type-set size and ``trust_level`` (:data:`TRUST_LEVELS`), metadata = the
    trust tag of the nucleus' tile (QuPath >= 0.5 shows it; 0.4 keeps only the measurement).
    Polygons are clipped to the slide; a nucleus with no area left is not written (nor counted)."""
    from cellvit_optimus.engine.geojson import clip_ring, closed_ccw, coords_feature_json, feature_id, ring_area_centroid

    # Each feature goes straight to its text and only the text is kept. Holding every feature's dicts
    # and coordinate lists (~50 containers per nucleus) until the end made CPython's cyclic GC start
    # full collections: each walks every tracked object in the process (~0.44 M once torch and Numba
    # are loaded) with the GIL held, 250-480 ms that stalled a host's event loop. Short-lived
    # containers are freed by reference counting and never reach the old generation; the table keeps
    # numpy arrays only (not tracked by the GC). This loop is still the stream's longest stretch of
    # GIL-holding Python, so it is kept lean and hands the GIL on.
    W, H = (float(v) for v in slide_dimensions)
    parts: list[str] = []
    ids: list[str] = []
    rings: list[np.ndarray] = []
    tid: list[int] = []
    tile: list[int] = []
    prob: list[float] = []
    sizes: list[int] = []
    area: list[float] = []
    cx: list[float] = []
    cy: list[float] = []
    hand_off = GilHandOff()
    # batches may arrive in any order: list nuclei by tile (and, within a tile, as the kernel found them)
    for i in np.argsort(np.asarray(records.tile_of, np.int64), kind="stable").tolist():
        hand_off()
        ring = clip_ring(records.contours[i], W, H)
        coords = closed_ccw(ring) if ring is not None else None  # kernel contours are simple polygons
        if coords is None:
            continue
        t = records.types[i]
        known = 0 < t <= profile.num_classes
        tag = tile_tags[records.tile_of[i]]
        p = round(records.type_probs[i], 4)
        meas = {"type_prob": p, "area_px": round(records.areas[i], 2)}
        if set_sizes is not None:
            meas["type_set_size"] = int(set_sizes[i])
        meas["trust_level"] = TRUST_LEVELS[tag]
        fid = feature_id(coords, namespace)
        if as_text:
            parts.append(coords_feature_json(coords, profile.label(t) if known else None,
                                             profile.color(t) if known else None, meas, None, "detection",
                                             {"trust": tag}, namespace, fid=fid))
        ids.append(fid)
        rings.append(np.asarray(coords, np.float64))
        tid.append(t if known else 0)
        tile.append(records.tile_of[i])
        prob.append(p)
        sizes.append(-1 if set_sizes is None else int(set_sizes[i]))
        a, x, y = ring_area_centroid(rings[-1])
        area.append(a)
        cx.append(x)
        cy.append(y)
    # names and tags by index: no slide-sized conversion of Python strings while holding the GIL
    names = np.asarray([UNCLASSIFIED] + [profile.label(c) for c in range(1, profile.num_classes + 1)])
    type_id = np.asarray(tid, np.int16)
    table = CellTable.from_columns(ids=ids, contours=rings, type_id=type_id, type_name=names[type_id],
                                   type_prob=prob, trust=np.asarray(tile_tags)[np.asarray(tile, np.int64)],
                                   type_set_size=sizes, area=area, centroid_x=cx, centroid_y=cy)
    return table, parts


def regions_geojson(grid: Any, tags: Any, namespace: uuid.UUID) -> JsonDict:
    """one QuPath annotation per region (8-connected tile group): union of its tiles' footprints,
    clipped to the slide, exteriors counter-clockwise (RFC 7946); tag as classification, reason in the
    name (QuPath 0.4 keeps names, not metadata) and as metadata, tile count and ``trust_level`` as
    measurements; locked, as machine-made annotations"""
    from shapely.geometry import MultiPolygon, box, mapping
    from shapely.geometry.polygon import orient
    from shapely.ops import unary_union

    w0, h0 = grid.level0_size
    W, H = grid.slide_dimensions
    slide = box(0, 0, W, H)
    feats = []
    for r, dec in enumerate(tags.regions):
        members = np.nonzero(tags.region_of_tile == r)[0]
        if not len(members):
            continue
        shape = unary_union([box(x, y, x + w0, y + h0) for x, y in grid.coords[members].tolist()])
        shape = shape.intersection(slide)
        polys = [g for g in getattr(shape, "geoms", [shape]) if g.geom_type == "Polygon" and g.area > 0]
        if not polys:
            continue
        polys = [orient(g, sign=1.0) for g in polys]  # exterior counter-clockwise, holes clockwise
        shape = polys[0] if len(polys) == 1 else MultiPolygon(polys)
        tag = dec.tag.value
        feats.append({"type": "Feature", "id": str(uuid.uuid5(namespace, f"region/{r}")),
                      "geometry": mapping(shape),
                      "properties": {"objectType": "annotation",
                                     "name": f"{tag} region {r + 1}: {dec.reason}",
                                     "classification": {"name": tag, "color": list(TAG_COLOURS[tag])},
                                     "isLocked": True,
                                     "measurements": {"tiles": float(len(members)),
                                                      "trust_level": float(TRUST_LEVELS[tag])},
                                     "metadata": {"trust": tag, "reason": dec.reason}}})
    return {"type": "FeatureCollection", "features": feats}


def overview_image(mask: Any, grid: Any, nuclei_per_tile: np.ndarray, tile_tags: list[str],
              attention: np.ndarray | None, title: str = "") -> np.ndarray:
    """three titled panels (tissue + tiles, nuclei density or MIL attention, trust tags) with a legend
    under each: the tissue colours, a colour bar with its scale, the tag colours with tile counts"""
    base = draw_overlay(mask, None)
    h, w = base.shape[:2]
    dx, dy = mask.downsample
    dens = np.zeros((h, w), np.float32)
    # float32 throughout: a float64 copy of a 3-megapixel thumbnail is 78 MiB, and there were several
    thumb = mask.thumbnail.astype(np.float32)
    tagimg = thumb.copy()
    values = attention if attention is not None else nuclei_per_tile.astype(np.float32)
    vmax = float(values.max()) if len(values) and values.max() > 0 else 1.0
    w0, h0 = grid.level0_size
    for i, (x, y) in enumerate(grid.coords.tolist()):
        x0, y0 = int(x / dx), int(y / dy)
        x1, y1 = min(int((x + w0) / dx) + 1, w), min(int((y + h0) / dy) + 1, h)
        dens[y0:y1, x0:x1] = np.maximum(dens[y0:y1, x0:x1], values[i] / vmax)
        c = np.array(TAG_COLOURS[tile_tags[i]], np.float32)
        tagimg[y0:y1, x0:x1] = np.float32(0.55) * thumb[y0:y1, x0:x1] + np.float32(0.45) * c
    heat = _heat_colours(dens)
    heat *= np.float32(0.6)
    heat += np.float32(0.4) * thumb
    heat = np.where(dens[..., None] > 0, heat, thumb)
    del thumb
    if attention is not None:
        scale = ("MIL attention", "0", f"{vmax:.3g} (max)")
    else:
        scale = ("nuclei per tile", "0", f"{vmax:.0f}")
    counts = {t: tile_tags.count(t) for t in TAG_COLOURS}
    panels = [
        ("tissue and artefacts", base, [("tissue", (0, 200, 0)), ("pen / artefact", (230, 0, 0))], None),
        ("nuclei density" if attention is None else "MIL attention", heat, [], scale),
        ("trust tags", tagimg, [(f"{t.replace('_', ' ')} ({counts[t]})", c) for t, c in TAG_COLOURS.items()],
         None),
    ]
    return _compose(panels, title)


def _heat_colours(v: np.ndarray) -> np.ndarray:
    """the density colour map, blue (low) to red (high), for values in [0, 1]"""
    return np.stack([255 * v, 80 * (1 - v), 255 * (1 - v)], -1).astype(np.float32)


def _compose(panels: list[tuple[str, np.ndarray, list[tuple[str, tuple[int, int, int]]], Any]],
             title: str) -> np.ndarray:
    """lay the panels side by side with a title above each and its legend or colour bar below"""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    h = max(p[1].shape[0] for p in panels)
    col = max(max(p[1].shape[1] for p in panels), 200)  # room for the legends on tiny thumbnails
    gap, top, legend_h = 8, 38 if title else 20, 18 * max(max(len(p[2]), 2) for p in panels) + 6
    canvas = Image.new("RGB", (len(panels) * col + (len(panels) - 1) * gap, top + h + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 2), title, fill=(0, 0, 0), font=font)
    for k, (name, img, swatches, scale) in enumerate(panels):
        x = k * (col + gap)
        arr = img if img.dtype == np.uint8 else np.clip(img, 0, 255, out=img).astype(np.uint8)
        canvas.paste(Image.fromarray(arr), (x + (col - arr.shape[1]) // 2, top))
        draw.text((x + 2, top - 17), name, fill=(0, 0, 0), font=font)
        y = top + h + 5
        for label, colour in swatches:
            draw.rectangle((x + 2, y + 2, x + 13, y + 13), fill=tuple(colour), outline=(60, 60, 60))
            draw.text((x + 18, y), label, fill=(0, 0, 0), font=small)
            y += 18
        if scale is not None:
            what, lo, hi = scale
            bar_w = col - 8
            ramp = _heat_colours(np.linspace(0, 1, bar_w, dtype=np.float32))
            bar = np.repeat(ramp[None], 10, axis=0).clip(0, 255).astype(np.uint8)
            canvas.paste(Image.fromarray(bar), (x + 4, y + 2))
            draw.text((x + 4, y + 14), lo, fill=(0, 0, 0), font=small)
            hi_w = draw.textlength(hi, font=small)
            draw.text((x + 4 + bar_w - hi_w, y + 14), hi, fill=(0, 0, 0), font=small)
            mid_w = draw.textlength(what, font=small)
            draw.text((x + 4 + (bar_w - mid_w) / 2, y + 14), what, fill=(0, 0, 0), font=small)
    return np.asarray(canvas)


def _failure_reason(f: Failure) -> str:
    """the worklist's reason for a failed input: the message without the path (its own column) and without
    the category a second time (``no MPP: x.svs: no MPP (...)`` was written before)"""
    msg = f.message
    for prefix in (f"{f.path}: ", f"{Path(f.path).name}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
            break
    return msg if msg.lower().startswith(f.reason.lower()) else f"{f.reason}: {msg}"


def write_worklist(out: Path, results: Sequence[SlideResult | Failure],
                   skipped: Sequence[tuple[str, str]] = (),
                   names: dict[str, str] | None = None) -> BatchResult:
    """rank the batch's finished slides by priority (ties by name), list failures and skipped inputs after
    them, and write ``out/worklist.csv`` and ``out/worklist.json`` atomically; the same ranking for one
    process and for a Ray driver, which writes it without loading a model. ``names``: the output name
    of each input (``str(path)``) as the batch wrote them (default: :func:`~.io.output_names` of the
    results). Paths and messages are written escaped (:func:`~.io.escape_path`): a file name need not
    be UTF-8, and every name the OS accepts must reach the worklist."""
    ok = [r for r in results if isinstance(r, SlideResult)]
    bad = [r for r in results if isinstance(r, Failure)]
    if names is None:
        names = output_names([r.path for r in results])  # the batch's names (symmetric in order)
    ranked = sorted(ok, key=lambda r: (-r.priority, r.name))
    esc = escape_path
    rows = []
    for rank, r in enumerate(ranked, 1):
        rows.append({"rank": rank, "slide": r.name, "path": esc(r.path),
                     "status": "cached" if r.cached else "done", "priority": r.priority,
                     "priority_source": r.priority_source, "tag": r.tag, "reason": r.reason,
                     "tiles": r.tiles, "nuclei": r.nuclei, "review_fraction": r.tag_fractions["review"],
                     "out_of_domain_fraction": r.tag_fractions["out_of_domain"]})
    for f in bad:
        rows.append({"rank": "", "slide": names.get(f.path, esc(Path(f.path).stem)), "path": esc(f.path),
                     "status": "failed", "priority": "", "priority_source": "", "tag": "",
                     "reason": esc(_failure_reason(f)), "tiles": "", "nuclei": "",
                     "review_fraction": "", "out_of_domain_fraction": ""})
    for path, why in skipped:
        rows.append({"rank": "", "slide": esc(Path(path).name), "path": esc(path), "status": "skipped",
                     "priority": "", "priority_source": "", "tag": "", "reason": esc(why),
                     "tiles": "", "nuclei": "", "review_fraction": "", "out_of_domain_fraction": ""})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["rank"])
    w.writeheader()
    w.writerows(rows)
    csv_path, json_path = out / "worklist.csv", out / "worklist.json"
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    atomic_write_json(json_path, {"slides": rows, "complete": not bad,
                                  "status": "complete" if not bad else ("partial" if ok else "failed")})
    return BatchResult(ok, bad, str(csv_path), str(json_path), list(skipped))
