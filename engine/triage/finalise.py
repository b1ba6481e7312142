"""Finishing one computed slide: per-tile signals -> safety tags -> priority -> outputs -> :class:`SlideResult`.

Where it sits: after the scheduler reports a slide's last batch in, the :class:`~.engine.Engine` calls
:func:`finalise_slide` (in input order, so shadow-mode counting never depends on timing) with the
slide's :class:`~.consumer.SlideState`. It scores OOD (the backbone embedding next to per-tile stain
and sharpness statistics, the recipe of the OOD state), conformal nucleus-type set sizes, quality
flags (the safety thresholds' limits), trust tags per tile / region / slide (shadow mode for a new
site), the MIL score or the fallback priority, and writes the outputs (:mod:`.outputs`), ``summary.json``
last: it marks the slide finished and records a checksum of every file the slide delivers.

Fallback priority (no MIL checkpoint): from ``d``, the density of nuclei of the focus classes per mm^2
of analysed tissue (:data:`FOCUS_CLASSES`: epithelial and inflammatory in the CoNSeP profile, plus
neoplastic, tumour and lymphocyte in profiles that have them; a crude proxy for cellular, inflamed or
neoplastic tissue),
``priority = d / (d + 5,000)``: 0 without such nuclei, 0.5 at 5,000 / mm^2, strictly increasing and
never 1, so dense slides still rank among themselves (the former ``d / 5,000`` clipped to 1 put the
bundled slide, 8,160 / mm^2, level with every denser one). ``summary.json`` keeps ``d`` itself
(``focus_density_per_mm2``). Slides whose tag is not ``reliable`` keep their rank but carry the tag.
"""

from __future__ import annotations

import gzip
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellvit_optimus.engine.io import atomic_write_bytes, atomic_write_json, atomic_write_png, file_digest
from cellvit_optimus.engine.pipeline import job_fingerprint, slide_fingerprint
from cellvit_optimus.engine.triage.cells import UNCLASSIFIED
from cellvit_optimus.engine.triage.config import TriageConfig
from cellvit_optimus.engine.triage.consumer import NucleiRecords, SlideState
from cellvit_optimus.engine.triage.outputs import TAG_COLOURS, cells_output, overview_image, regions_geojson
from cellvit_optimus.engine.triage.results import PrioritySource, SlideResult

if TYPE_CHECKING:
    from cellvit_optimus.safety import MahalanobisOOD, SplitConformal, TagThresholds

__all__ = ("FALLBACK_DENSITY_HALF", "FOCUS_CLASSES", "PRIORITY_RULE", "FinaliseContext", "fallback_priority", "mean_per_tile",
           "ood_score", "type_set_sizes", "finalise_slide")

log = logging.getLogger(__name__)

#: class names counted by the fallback priority, over the class profiles the engine ships (CoNSeP,
#: PanNuke-like, PUMA): a profile counts those of its classes that appear here
FOCUS_CLASSES = ("epithelial", "inflammatory", "neoplastic", "tumour", "lymphocyte")
#: focus-class nuclei per mm^2 that map to priority 0.5 in the fallback rule
FALLBACK_DENSITY_HALF = 5000.0
#: names the fallback rule in the run key: a rerun after the rule changes recomputes the priority
PRIORITY_RULE = "density/(density+5000)"


def fallback_priority(density_per_mm2: float) -> float:
    """``d / (d + FALLBACK_DENSITY_HALF)``: monotone in the density, 0.5 at the half value, never 1"""
    d = max(float(density_per_mm2), 0.0)
    return d / (d + FALLBACK_DENSITY_HALF)


@dataclass(frozen=True)
class FinaliseContext:
    """what finishing a slide needs from the engine: its config, the models' safety states and heads"""

    config: TriageConfig
    thresholds: TagThresholds
    profile: Any  # the nuclei model's class profile (labels, colours)
    nuclei_mpp: float
    ood: MahalanobisOOD | None = None
    conformal: SplitConformal | None = None
    mil: Any = None  # gated-attention MIL head, when loaded


def mean_per_tile(values: np.ndarray | None, tile_of: list[int], n_tiles: int) -> np.ndarray | None:
    """mean of per-nucleus ``values`` over each tile's nuclei ``(n_tiles,)``; NaN for a tile without any"""
    if values is None:
        return None
    t = np.asarray(tile_of, np.int64)
    n = np.bincount(t, minlength=n_tiles).astype(np.float64)
    s = np.bincount(t, weights=np.asarray(values, np.float64), minlength=n_tiles)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / n, np.nan)


def ood_score(ood: MahalanobisOOD, emb: np.ndarray, records: NucleiRecords) -> np.ndarray:
    """Mahalanobis distance of each tile's OOD feature (the recipe the OOD state was fitted on)"""
    from cellvit_optimus.safety import ood_features

    return ood.score(ood_features(ood.features, emb, records.tile_stats))


def type_set_sizes(conformal: SplitConformal | None, records: NucleiRecords) -> np.ndarray | None:
    """conformal type-set size of every nucleus ``(N,)``, or None without a calibration state"""
    if conformal is None or len(records.type_scores) == 0:
        return None
    from cellvit_optimus.safety.conformal import type_probabilities

    probs = type_probabilities(np.concatenate(records.type_scores))
    if probs.shape[0] != len(records.tile_of):
        return None
    # a canonical nucleus order (by tile, then as the kernel found them), so the randomised sets
    # do not depend on the order batches arrived in
    order = np.argsort(np.asarray(records.tile_of, np.int64), kind="stable")
    sizes = np.empty(order.size, np.int64)
    sizes[order] = conformal.set_sizes(conformal.predict_sets(probs[order]))
    return sizes


def finalise_slide(ctx: FinaliseContext, state: SlideState, timings: dict[str, float], out: Path, key: str,
                   name: str, features_path: str) -> SlideResult:
    """tag, rank and write one computed slide under ``out/name``; ``summary.json`` is written last"""
    from cellvit_optimus.safety import ShadowMode, TileSignals, tag_all
    from cellvit_optimus.safety.tags import quality_flags

    job, nuc = state.job, state.records
    grid, mask = job.grid, job.mask
    assert grid is not None
    config, safety = ctx.config, ctx.config.safety
    sdir = out / name
    t0 = time.perf_counter()
    emb = nuc.embeddings if nuc.embeddings is not None else np.zeros((len(grid), 1), np.float32)
    ood = ood_score(ctx.ood, emb, nuc) if ctx.ood is not None else None
    # pen/artefact and blur limits are the safety thresholds' (a site's threshold file may set them)
    flags = quality_flags(grid.artefact_fraction, state.blur, ctx.thresholds)
    set_sizes = type_set_sizes(ctx.conformal, nuc)
    signals = TileSignals(ood_score=ood, np_entropy=nuc.np_entropy, nt_entropy=nuc.nt_entropy,
                          hv_consistency=nuc.hv_consistency, quality_flags=flags,
                          nucleus_set_size=mean_per_tile(set_sizes, nuc.tile_of, len(grid)))
    site = Path(safety.site_state_path) if safety.site_state_path else out / "site_state.json"
    shadow = (ShadowMode(site, safety.site_id, n_slides=safety.shadow_slides, write=atomic_write_bytes)
              if safety.shadow_slides else None)
    fingerprint = slide_fingerprint(job.path)
    tags = tag_all(signals, grid.coords, grid.stride, ctx.thresholds, shadow=shadow, slide_id=fingerprint)
    tile_tags = [d.tag.value for d in tags.tiles]

    profile = ctx.profile
    # ids of this slide's objects: uuid5 in a namespace of the slide's content, so reruns agree
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"cellvit-optimus/slide/{fingerprint}")
    cells, parts = cells_output(nuc, profile, tile_tags, set_sizes, grid.slide_dimensions, namespace,
                                as_text="cells" in config.outputs)
    # counts are of the nuclei written: they add up to the features of cells.geojson
    per_type = np.bincount(cells.type_id.astype(np.int64), minlength=profile.num_classes + 1)
    counts = {profile.label(c): int(per_type[c]) for c in range(1, profile.num_classes + 1)}
    counts[UNCLASSIFIED] = int(per_type[0])
    mpp0 = (job.facts.mpp or (ctx.nuclei_mpp,))[0]
    tissue_mm2 = float(np.sum(grid.tissue_fraction)) * (grid.stride[0] * grid.stride[1]) * mpp0 ** 2 / 1e6
    attention = None
    density = None
    source: PrioritySource
    if ctx.mil is not None:
        from cellvit_optimus.heads import predict_mil

        pred = predict_mil(ctx.mil, [emb])
        priority = float(1 / (1 + np.exp(-float(np.ravel(pred.logits)[0]))))
        attention = np.asarray(pred.attention[0], np.float32)
        source = "mil"
    else:
        focus = sum(v for k, v in counts.items() if k in FOCUS_CLASSES)
        density = focus / max(tissue_mm2, 1e-9)
        priority = fallback_priority(density)
        source = "fallback"
    fractions = {t: round(tile_tags.count(t) / max(len(tile_tags), 1), 4) for t in TAG_COLOURS}

    outputs: dict[str, str] = {"features": features_path}
    if "cells" in config.outputs:
        data = ('{"type":"FeatureCollection","features":[' + ",".join(parts) + "]}\n").encode()
        del parts
        if config.gzip_cells:
            p = sdir / "cells.geojson.gz"
            data = gzip.compress(data, compresslevel=6, mtime=0)  # no timestamp: reruns are identical
        else:
            p = sdir / "cells.geojson"
        atomic_write_bytes(p, data)
        outputs["cells"] = str(p)
    if "regions" in config.outputs:
        p = sdir / "regions.geojson"
        atomic_write_json(p, regions_geojson(grid, tags, namespace), indent=None)
        outputs["regions"] = str(p)
    if "thumbnail" in config.outputs:
        p = sdir / "overview.png"
        atomic_write_png(p, overview_image(mask, grid, nuc.nuclei_per_tile, tile_tags, attention, title=name))
        outputs["thumbnail"] = str(p)
    timings = {**{k: round(v, 3) for k, v in timings.items()}, "finalise_s": round(time.perf_counter() - t0, 3)}
    result = SlideResult(path=str(job.path), name=name, tag=tags.slide.tag.value, reason=tags.slide.reason,
                         priority=round(priority, 6), priority_source=source, tiles=len(grid),
                         nuclei=len(cells), counts=counts, tag_fractions=fractions, outputs=outputs,
                         timings=timings, cells=cells)
    # what a rerun checks before it trusts this slide as finished (outputs.finished_result): every file
    # delivered, as it is on disk now, paths relative to the output folder (which may be moved)
    checksums = {}
    for kind, f in outputs.items():
        fp = Path(f)
        if kind == "features" and "features" not in config.outputs:
            continue  # listed, but not written by this run
        if fp.is_file() and fp.is_relative_to(out):
            checksums[kind] = {"file": fp.relative_to(out).as_posix(), **file_digest(fp)}
    summary = {"run_key": key, "slide_fingerprint": job_fingerprint(job), "checksums": checksums,
               "result": {k: v for k, v in result.to_dict().items() if k != "cached"},
               "tissue_mm2": round(tissue_mm2, 4), "nuclei_mpp": ctx.nuclei_mpp,
               "focus_density_per_mm2": None if density is None else round(density, 2),
               "regions": [{"tag": d.tag.value, "reason": d.reason} for d in tags.regions],
               # JPEG tiles strictly re-decoded and the corrupt ones (level, col, row); a slide with any
               # corrupt tile in what it read fails instead ("corrupt tiles"), so done slides list none
               "tile_check": job.slide.tile_check() if job.slide is not None else None}
    outputs["summary"] = str(sdir / "summary.json")
    summary["result"]["outputs"] = outputs
    atomic_write_json(sdir / "summary.json", summary)  # last: marks the slide finished
    return result
