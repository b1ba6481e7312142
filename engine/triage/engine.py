"""The triage product: slides in, per-slide outputs and a ranked worklist out.

One streaming pass per slide through the scheduler: tissue tiles at the nuclei resolution (with
overlap) -> backbone (tile embeddings + token maps) -> UNETR head (NP/HV/NT maps) -> fan-out to

- the feature writer (``features/<slide>.h5``, the extraction layout; embeddings feed MIL and OOD),
- the nuclei consumer: HV post-processing of each batch as it arrives, keeping each nucleus in the
  one tile whose core (the tile minus half the overlap on sides that have a neighbour) holds its
  centroid, so no slide-sized map is ever held, plus per-tile uncertainty (NP/NT entropy, HV
  consistency) and nuclei counts.

When a slide's last batch is in: OOD scores (the backbone embedding next to per-tile stain and
sharpness statistics, the recipe of the OOD state), conformal nucleus-type set sizes, trust tags per
tile / region / slide (shadow mode for a new site), MIL score or the fallback priority, and the outputs (cells and regions GeoJSON for
QuPath, an overview PNG, ``summary.json`` last). Every file is written atomically; ``summary.json``
marks a finished slide, so a rerun skips it when its run key, path and slide fingerprint (size, mtime,
content samples) all match; an unreadable or malformed summary is moved aside and the slide recomputed.
A run holds the output folder's lock for its whole length (:func:`~.io.folder_lock`), and each slide
writes under its :func:`~.io.output_name`, which cannot leave the folder or hit its reserved names.

Fallback priority (no MIL checkpoint): from ``d``, the density of nuclei typed as epithelial or
inflammatory per mm^2 of analysed tissue (a crude proxy for cellular, inflamed or neoplastic tissue),
``priority = d / (d + 5,000)``: 0 without such nuclei, 0.5 at 5,000 / mm^2, strictly increasing and
never 1, so dense slides still rank among themselves (the former ``d / 5,000`` clipped to 1 put the
bundled slide, 8,160 / mm^2, level with every denser one). ``summary.json`` keeps ``d`` itself
(``focus_density_per_mm2``). Slides whose tag is not ``reliable`` keep their rank but carry the tag.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.triage.cells import UNCLASSIFIED, CellTable
from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.pipeline.extract import FeatureExtractor, TileReadPath, job_fingerprint, open_job_for
from cellvit_optimus.engine.pipeline.features import slide_fingerprint
from cellvit_optimus.engine.wsi.inspect import Failure
from cellvit_optimus.engine.io import (atomic_write_bytes, atomic_write_json, atomic_write_png, clean_stale_temporaries, folder_lock,
                 move_aside, output_names)
from cellvit_optimus.engine.pipeline.scheduler import Progress, SchedulerConfig, SlideDone, SlideJob, TileBatch, run_pipeline
from cellvit_optimus.engine.wsi.tissue import TilingConfig, TissueConfig, draw_overlay

__all__ = ("TriageConfig", "SlideResult", "BatchResult", "Engine", "OUTPUTS", "FALLBACK_DENSITY_HALF",
           "fallback_priority")

log = logging.getLogger(__name__)

OUTPUTS = ("features", "cells", "regions", "thumbnail", "summary")
#: epithelial + inflammatory nuclei per mm^2 that map to priority 0.5 in the fallback rule
FALLBACK_DENSITY_HALF = 5000.0
#: names the fallback rule in the run key: a rerun after the rule changes recomputes the priority
_PRIORITY_RULE = "density/(density+5000)"


def fallback_priority(density_per_mm2: float) -> float:
    """``d / (d + FALLBACK_DENSITY_HALF)``: monotone in the density, 0.5 at the half value, never 1"""
    d = max(float(density_per_mm2), 0.0)
    return d / (d + FALLBACK_DENSITY_HALF)

_TAG_COLOURS = {"reliable": (40, 170, 60), "review": (240, 170, 20), "out_of_domain": (220, 40, 40)}


@dataclass(frozen=True)
class TriageConfig:
    """everything a triage run needs besides the models"""

    tissue: TissueConfig = field(default_factory=TissueConfig)
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(batch_tiles=16))
    mpp: float | None = None  # level-0 MPP override
    backend: str = "auto"
    decoder: str = "auto"  # tile read path (extract.DECODERS): GPU JPEG decode when it measures faster
    nuclei_mpp: float | None = None  # default: the nuclei model's training resolution
    overlap_px: int = 64  # tile overlap at the nuclei resolution (nuclei up to 32 px radius stay whole)
    min_tissue_fraction: float = 0.25
    outputs: tuple[str, ...] = OUTPUTS
    thresholds: str | None = None  # TagThresholds JSON; default: conservative built-in defaults
    ood_state: str | None = None  # MahalanobisOOD state (.npz) fitted for this backbone
    nucleus_conformal: str | None = None  # SplitConformal state (.json) of the nuclei checkpoint's types
    shadow_slides: int = 30  # cold start: the first N slides of a site are never cleared
    site_state: str | None = None  # shadow-mode counter file; default OUT/site_state.json
    site_id: str = "default"
    lock_timeout_s: float | None = None  # a second run on a locked output folder waits this long (None: until free)
    gzip_cells: bool = False  # write cells.geojson.gz (deterministic gzip) instead of cells.geojson

    def __post_init__(self) -> None:
        unknown = set(self.outputs) - set(OUTPUTS)
        if unknown:
            raise ConfigError(f"outputs={sorted(unknown)} unknown; choose from {', '.join(OUTPUTS)}")
        if "summary" not in self.outputs:
            raise ConfigError("outputs must include 'summary' (it marks a finished slide)")
        if self.overlap_px < 0:
            raise ConfigError(f"overlap_px={self.overlap_px} must be >= 0")
        if self.shadow_slides < 0:
            raise ConfigError(f"shadow_slides={self.shadow_slides} must be >= 0")
        if self.lock_timeout_s is not None and not self.lock_timeout_s >= 0:
            raise ConfigError(f"lock_timeout_s={self.lock_timeout_s} must be >= 0 (or None: wait until free)")
        from cellvit_optimus.engine.pipeline.extract import DECODERS

        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder={self.decoder!r} is not one of {', '.join(DECODERS)}")


@dataclass
class SlideResult:
    """a triaged slide"""

    path: str
    name: str
    tag: str
    reason: str
    priority: float
    priority_source: str  # "mil" or "fallback"
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


# --------------------------------------------------------------------------------------------------
# per-slide nuclei consumer
# --------------------------------------------------------------------------------------------------


class _NucleiConsumer:
    """post-processes batches as they arrive and keeps compact per-nucleus records only"""

    def __init__(self, job: SlideJob, post: Any, num_types: int, overlap: int, tile_stats: bool = False) -> None:
        grid = job.grid
        assert grid is not None
        self.grid = grid
        self.post = post
        self.scale = grid.level0_size[0] / grid.tile_size  # level-0 px per nuclei-grid px
        # nuclei below the checkpoint's minimum area (um^2) are specks, never reported; the grid's pixel is
        # scale level-0 pixels, whose true size is the slide's MPP (target_mpp is met only to a tolerance)
        mpp0 = getattr(job.slide, "mpp", None)
        self.min_px = post.min_area_px(float(np.mean(mpp0)) * self.scale if mpp0 else grid.target_mpp)
        n = len(grid)
        self.n_tiles = n
        self.half = overlap / 2
        lattice = {tuple(g) for g in grid.grid_index.tolist()}
        # a side without a neighbour tile keeps its nuclei up to the tile edge
        self.open_side = np.array([[(c - 1, r) not in lattice, (c + 1, r) not in lattice,
                                    (c, r - 1) not in lattice, (c, r + 1) not in lattice]
                                   for c, r in grid.grid_index.tolist()], bool).reshape(-1, 4)
        self.np_entropy = np.full(n, np.nan, np.float32)
        self.nt_entropy = np.full(n, np.nan, np.float32)
        self.hv_consistency = np.full(n, np.nan, np.float32)
        self.nuclei_per_tile = np.zeros(n, np.int32)
        # stain/sharpness statistics for the OOD feature, when the OOD state's recipe uses them
        self.tile_stats: np.ndarray | None = None
        if tile_stats:
            from cellvit_optimus.safety.ood_features import N_TILE_STATS

            self.tile_stats = np.zeros((n, N_TILE_STATS), np.float32)
        self.embeddings: np.ndarray | None = None
        self.contours: list[np.ndarray] = []
        self.types: list[int] = []
        self.type_probs: list[float] = []
        self.type_scores: list[np.ndarray] = []  # per tile, (kept nuclei, C + 1) mean class probabilities
        self.areas: list[float] = []
        self.centroids: list[tuple[float, float]] = []
        self.tile_of: list[int] = []
        self.num_types = num_types

    def on_batch(self, batch: TileBatch) -> None:
        from cellvit_optimus.safety import tile_uncertainty

        from cellvit_optimus.engine.pipeline.nuclei import tile_to_instances

        emb, maps = batch.output
        idx = batch.indices
        if self.embeddings is None:
            self.embeddings = np.zeros((self.n_tiles, emb.shape[1]), np.float32)
        self.embeddings[idx] = emb
        if self.tile_stats is not None:
            from cellvit_optimus.safety import tile_statistics

            tiles = batch.tiles if isinstance(batch.tiles, np.ndarray) else batch.tiles.cpu().numpy()  # GPU read path
            self.tile_stats[idx] = tile_statistics(tiles)
        np_probs = np.stack([1.0 - maps.np, maps.np], axis=1)
        u = tile_uncertainty(np_probs, maps.nt, maps.hv)
        self.np_entropy[idx], self.nt_entropy[idx] = u.np_entropy, u.nt_entropy
        self.hv_consistency[idx] = u.hv_consistency
        s = self.grid.tile_size
        p = self.post
        for k, t in enumerate(idx.tolist()):
            _, table = tile_to_instances(maps.np[k], maps.hv[k], maps.nt[k], p)  # the type prior applies here too
            left, right, top, bottom = self.open_side[t]
            x_lo, x_hi = (0.0 if left else self.half), (s if right else s - self.half)
            y_lo, y_hi = (0.0 if top else self.half), (s if bottom else s - self.half)
            x0, y0 = (float(v) for v in self.grid.coords[t])
            kept = 0
            sel: list[int] = []
            for i in range(len(table)):
                cx, cy = table.centroids[i]
                if not (x_lo <= cx < x_hi and y_lo <= cy < y_hi):
                    continue  # another tile's core owns it
                if table.areas[i] < self.min_px:
                    continue
                self.contours.append(np.asarray(table.contours[i], np.float64) * self.scale + (x0, y0))
                self.centroids.append((x0 + cx * self.scale, y0 + cy * self.scale))
                self.types.append(int(table.types[i]))
                self.type_probs.append(float(table.type_probs[i]))
                self.areas.append(float(table.areas[i]) * self.scale ** 2)
                self.tile_of.append(t)
                kept += 1
                sel.append(i)
            self.nuclei_per_tile[t] = kept
            if table.type_scores is not None:
                self.type_scores.append(np.asarray(table.type_scores, np.float32)[sel])

    def finish(self, job: SlideJob) -> dict[str, Any]:
        return {}  # the engine finalises the slide with everything collected here

    def abort(self, job: SlideJob) -> None:
        self.contours.clear()


# --------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------


class Engine:
    """the whole pipeline as a library object

    ``Engine().run(slides, out)`` is synchronous; ``async for r in Engine().stream(slides, out)``
    yields per-slide results as slides finish and never blocks the host event loop (all blocking work
    runs in worker threads). Engines share no state: two can live in one process.

    Parameters
    ----------
    config : what to tile, thresholds, outputs
    nuclei_weights : nuclei checkpoint (default: the bundled model)
    backbone_weights : weights of the backbone the nuclei head was trained on, when not a seeded init
    mil_weights : optional gated-attention MIL checkpoint for the slide score
    device : ``"cpu"``, ``"cuda"``, ``"auto"``
    batch_size : tiles per backbone call
    """

    def __init__(self, config: TriageConfig | None = None, *, nuclei_weights: str | os.PathLike[str] | None = None,
                 backbone_weights: str | os.PathLike[str] | None = None,
                 mil_weights: str | os.PathLike[str] | None = None, device: str = "cpu",
                 batch_size: int = 16) -> None:
        from cellvit_optimus.engine.pipeline.nuclei import NucleiModel, PostProcessConfig

        self.config = config or TriageConfig()
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = NucleiModel(nuclei_weights, backbone_weights=backbone_weights, device=device,
                                 batch_size=batch_size)
        from cellvit_optimus.heads.backbone import check_finite

        # NaN/inf weights would give all-NaN outputs that still look like a finished slide
        # (backbone weights files are checked as they load, in load_state_dict_file)
        check_finite(self.model.head, self.model.path or nuclei_weights, " (nuclei head)")
        self.nuclei_mpp = float(self.config.nuclei_mpp or self.model.nuclei_mpp)
        # the checkpoint's tuned post-processing; its sizes are HoVer-Net's at 0.25 um/px (40x)
        self.post = (getattr(self.model, "post", None) or PostProcessConfig()).scaled(0.25 / self.nuclei_mpp)
        self.mil = None
        if mil_weights is not None:
            from cellvit_optimus.heads.checkpoint import load_mil

            self.mil = load_mil(mil_weights, backbone_id=self.model.runner.preset.name,
                                backbone_hash=self.model.runner.weights_id).model
            check_finite(self.mil, mil_weights, " (MIL head)")
        self.thresholds = self._load_thresholds()
        self.ood = self._load_ood()
        self.tiling = TilingConfig(tile_size=self.model.tile_size, target_mpp=self.nuclei_mpp,
                                   overlap=self.config.overlap_px / self.model.tile_size,
                                   min_tissue_fraction=self.config.min_tissue_fraction)
        self._model_hash = _file_hash(self.model.path) if self.model.path else "in-memory"
        self.conformal = self._load_conformal()
        self._warm_up()

    def _warm_up(self) -> None:
        """compile / load the Numba kernels now: compiling holds the GIL for long stretches, which
        must not happen later inside a host application's event loop"""
        from cellvit_optimus.kernels import hv_to_instances

        s = self.model.tile_size
        yy, xx = np.mgrid[0:s, 0:s]
        blob = (((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < (s / 8) ** 2).astype(np.float32)
        hv = np.stack([(xx - s / 2) / (s / 8), (yy - s / 2) / (s / 8)]).astype(np.float32) * blob
        nt = np.zeros((self.model.num_classes + 1, s, s), np.float32)
        nt[1] = 1.0
        hv_to_instances(blob, hv, nt, **self.post.kernel_kwargs())

    # -- set-up ------------------------------------------------------------------------------------
    def _load_thresholds(self):
        from cellvit_optimus.safety import TagThresholds

        if self.config.thresholds:
            return TagThresholds.load(self.config.thresholds)
        return TagThresholds(require_ood=False)  # conservative defaults; OOD judged when a state exists

    def _state_path(self, configured: str | None, bundled_name: str) -> str | None:
        """a safety state file: the configured one, else the bundled one when the bundled model runs
        (states are bound to their model; another model gets none by default)"""
        if configured is not None:
            return configured
        from cellvit_optimus.engine.data import DATA_DIR

        bundled = DATA_DIR / bundled_name
        if bundled.is_file() and self.model.path is not None and self.model.path.parent == DATA_DIR:
            return str(bundled)
        return None

    def _load_ood(self):
        from cellvit_optimus.safety import MahalanobisOOD

        path = self._state_path(self.config.ood_state, "default_ood.npz")
        self._ood_hash = _file_hash(Path(path)) if path is not None else None
        if path is None:
            return None
        ood = MahalanobisOOD.load(path, backbone_id=self.model.runner.preset.name,
                                  weights_hash=self.model.runner.weights_id)
        if ood.tile_mpp is not None and abs(ood.tile_mpp / self.nuclei_mpp - 1.0) > 0.05:
            # kept on purpose: tiles at another resolution than the reference's are out of its domain
            log.warning("%s: OOD state fitted on tiles at %.3g um/px, this run tiles at %.3g um/px: its "
                        "tiles will score as shifted (review or out_of_domain)", path, ood.tile_mpp, self.nuclei_mpp)
        self.thresholds = self.thresholds.with_ood(ood)
        return ood

    def _ood_score(self, emb: np.ndarray, nuc: _NucleiConsumer) -> np.ndarray:
        """Mahalanobis distance of each tile's OOD feature (the recipe the OOD state was fitted on)"""
        from cellvit_optimus.safety import ood_features

        assert self.ood is not None
        return self.ood.score(ood_features(self.ood.features, emb, nuc.tile_stats))

    def _load_conformal(self):
        """the nucleus-type calibration: the config's file, or the bundled one for the bundled model"""
        from cellvit_optimus.safety import SplitConformal

        path = self._state_path(self.config.nucleus_conformal, "default_nuclei_conformal.json")
        self._conformal_hash = _file_hash(Path(path)) if path is not None else None
        if path is None:
            return None
        cp = SplitConformal.load(path, model_id=self._model_hash, backbone_id=self.model.runner.preset.name,
                                 weights_hash=self.model.runner.weights_id)
        if cp.n_classes != self.model.num_classes:
            raise ConfigError(f"{path}: calibrated for {cp.n_classes} nucleus types, the model has "
                              f"{self.model.num_classes}")
        return cp

    def _type_set_sizes(self, nuc: _NucleiConsumer) -> np.ndarray | None:
        """conformal type-set size of every nucleus ``(N,)``, or None without a calibration state"""
        if self.conformal is None or len(nuc.type_scores) == 0:
            return None
        from cellvit_optimus.safety.conformal import type_probabilities

        probs = type_probabilities(np.concatenate(nuc.type_scores))
        if probs.shape[0] != len(nuc.tile_of):
            return None
        # a canonical nucleus order (by tile, then as the kernel found them), so the randomised sets
        # do not depend on the order batches arrived in
        order = np.argsort(np.asarray(nuc.tile_of, np.int64), kind="stable")
        sizes = np.empty(order.size, np.int64)
        sizes[order] = self.conformal.set_sizes(self.conformal.predict_sets(probs[order]))
        return sizes

    def run_key(self) -> str:
        """identity of everything that shapes a slide's outputs (a rerun with another key recomputes)"""
        doc = {"model": self.model.metadata.get("sha256") or str(self.model.path),
               "model_hash": self._model_hash,
               "backbone": self.model.runner.weights_id, "tiling": asdict(self.tiling),
               "tissue": asdict(self.config.tissue), "mpp": self.config.mpp, "post": asdict(self.post),
               "thresholds": asdict(self.thresholds), "outputs": list(self.config.outputs),
               "mil": self.mil is not None, "ood": self._ood_hash, "conformal": self._conformal_hash,
               "priority_rule": _PRIORITY_RULE,
               # 2: QuPath fields in measurements / metadata, UUID ids, geometry clipped to the slide
               "geojson": 2, "gzip_cells": self.config.gzip_cells}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]

    # -- running -----------------------------------------------------------------------------------
    def run(self, slides: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
            progress: Callable[[Progress], None] | None = None,
            skipped: Sequence[tuple[str, str]] = ()) -> BatchResult:
        """triage ``slides`` into ``out_dir``; returns the batch with its worklist (``skipped``: inputs
        not run, as ``(path, why)``, listed in the worklist too)

        Works from plain code and from inside a running event loop (a notebook): the work then runs
        on its own loop in a worker thread while this call waits (see :mod:`.aio`)."""
        import anyio

        from cellvit_optimus.engine.pipeline.aio import run_sync

        out = Path(os.path.abspath(out_dir))
        order = {os.path.abspath(p): i for i, p in enumerate(slides)}

        async def main() -> BatchResult:
            async with self._own_folder(out):  # the worklist too is written under the folder's lock
                got = [r async for r in self._stream_locked(slides, out, progress, None)]
                got.sort(key=lambda r: order.get(r.path, len(order)))
                return await anyio.to_thread.run_sync(self._worklist, out, got, skipped)

        return run_sync(main)

    @contextlib.asynccontextmanager
    async def _own_folder(self, out: Path) -> AsyncIterator[None]:
        """hold ``out``'s lock (waiting in a thread: the host's loop runs on) and clean what dead runs left"""
        import anyio

        lock = folder_lock(out, self.config.lock_timeout_s)

        def enter() -> None:
            out.mkdir(parents=True, exist_ok=True)
            lock.__enter__()
            try:
                # walks the whole output tree: file-system work, kept off the host's loop; safe under the
                # lock, since no other run writes here now
                clean_stale_temporaries(out)
            except BaseException:
                lock.__exit__(None, None, None)
                raise

        await anyio.to_thread.run_sync(enter)
        try:
            yield
        finally:
            lock.__exit__(None, None, None)

    async def stream(self, slides: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                     progress: Callable[[Progress], None] | None = None, *, clean_temporaries: bool = True,
                     names: Mapping[str, str] | None = None) -> AsyncIterator[SlideResult | Failure]:
        """per-slide results (features, nuclei, tags and outputs written)

        Slides are finalised, and so counted by shadow mode, in input order: a slide that finishes
        early waits for the ones before it, so tags never depend on timing. The run holds the output
        folder's lock throughout (another run waits ``config.lock_timeout_s``, then gets
        :class:`~.errors.OutputLockedError`). ``clean_temporaries=False`` is for workers of a run that
        already holds the lock elsewhere (Ray actors): no lock, no clean-up. ``names`` maps
        ``str(path)`` to output names (default: :func:`~.io.output_names` of this batch).
        """
        import anyio

        out = Path(os.path.abspath(out_dir))
        if clean_temporaries:
            async with self._own_folder(out):
                async for r in self._stream_locked(slides, out, progress, names):
                    yield r
        else:
            await anyio.to_thread.run_sync(lambda: out.mkdir(parents=True, exist_ok=True))
            async for r in self._stream_locked(slides, out, progress, names):
                yield r

    async def _stream_locked(self, slides: Sequence[str | os.PathLike[str]], out: Path,
                             progress: Callable[[Progress], None] | None,
                             names: Mapping[str, str] | None) -> AsyncIterator[SlideResult | Failure]:
        import anyio

        from cellvit_optimus.engine.wsi.inspect import failure_from

        # one path convention, as under Ray: every path in results, the worklist and summary.json is
        # absolute, so that the files still point at their slides and outputs from any working folder
        paths: list[Path] = []
        seen: set[str] = set()
        for p in slides:
            ap = os.path.abspath(p)
            if ap in seen:  # the same file twice would write its outputs twice at once
                log.warning("%s: given twice; triaged once", p)
                continue
            seen.add(ap)
            paths.append(Path(ap))
        position = {str(p): i for i, p in enumerate(paths)}
        key = self.run_key()
        factory = _TriageFactory(self, out, key, dict(names) if names is not None else output_names(paths))
        pending: dict[int, Any] = {}
        next_index = 0

        async def settle(r: Any) -> SlideResult | Failure:
            if isinstance(r, Failure):
                return r
            if r.cached:
                return SlideResult(**r.info["result"], cached=True)
            try:
                return await anyio.to_thread.run_sync(self._finalise, r, factory, out, key)
            except Exception as exc:  # one slide's outputs failing must not stop the batch
                log.info("%s: finalising failed: %s", r.path, exc)  # reported as the slide's Failure
                return failure_from(r.path, exc)

        async with run_pipeline(paths, open_job=factory.open_job, factory=factory, compute=self._forward,
                                config=self.config.scheduler, read_tiles=factory.read_path.read,
                                progress=progress) as results:
            async for r in results:
                pending[position[str(Path(r.path))]] = r
                while next_index in pending:
                    yield await settle(pending.pop(next_index))
                    next_index += 1

    def _forward(self, tiles: np.ndarray):
        """(embeddings (B, D) float32, NucleiMaps) of uint8 tiles: one backbone pass feeds both"""
        return self.model.forward(tiles)

    # -- finishing a slide -------------------------------------------------------------------------
    def _finalise(self, done: SlideDone, factory: _TriageFactory, out: Path, key: str) -> SlideResult:
        from cellvit_optimus.safety import ShadowMode, TileSignals, tag_all

        job: SlideJob = done.info.pop("_job")
        nuc: _NucleiConsumer = done.info.pop("_nuclei")
        grid, mask = job.grid, done.info.pop("_mask")
        assert grid is not None
        name = factory.name_of(job)
        sdir = out / name
        t0 = time.perf_counter()
        emb = nuc.embeddings if nuc.embeddings is not None else np.zeros((len(grid), 1), np.float32)
        ood = self._ood_score(emb, nuc) if self.ood is not None else None
        flags = []
        for art, blur in zip(grid.artefact_fraction.tolist(), factory.blur[job.index].tolist()):
            f = []
            if art > 0.25:
                f.append("pen/artefact")
            if blur < 15.0:
                f.append("blur")
            flags.append(",".join(f))
        set_sizes = self._type_set_sizes(nuc)
        signals = TileSignals(ood_score=ood, np_entropy=nuc.np_entropy, nt_entropy=nuc.nt_entropy,
                              hv_consistency=nuc.hv_consistency, quality_flags=flags,
                              nucleus_set_size=_mean_per_tile(set_sizes, nuc.tile_of, len(grid)))
        site = Path(self.config.site_state) if self.config.site_state else out / "site_state.json"
        shadow = (ShadowMode(site, self.config.site_id, n_slides=self.config.shadow_slides, write=atomic_write_bytes)
                  if self.config.shadow_slides else None)
        fingerprint = slide_fingerprint(job.path)
        tags = tag_all(signals, grid.coords, grid.stride, self.thresholds, shadow=shadow, slide_id=fingerprint)
        tile_tags = [d.tag.value for d in tags.tiles]

        profile = self.model.profile
        # ids of this slide's objects: uuid5 in a namespace of the slide's content, so reruns agree
        namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"cellvit-optimus/slide/{fingerprint}")
        cells, parts = _cells(nuc, profile, tile_tags, set_sizes, grid.slide_dimensions, namespace,
                              as_text="cells" in self.config.outputs)
        # counts are of the nuclei written: they add up to the features of cells.geojson
        per_type = np.bincount(cells.type_id.astype(np.int64), minlength=profile.num_classes + 1)
        counts = {profile.label(c): int(per_type[c]) for c in range(1, profile.num_classes + 1)}
        counts[UNCLASSIFIED] = int(per_type[0])
        mpp0 = (job.info.get("mpp") or [self.nuclei_mpp])[0]
        tissue_mm2 = float(np.sum(grid.tissue_fraction)) * (grid.stride[0] * grid.stride[1]) * mpp0 ** 2 / 1e6
        attention = None
        density = None
        if self.mil is not None:
            from cellvit_optimus.heads import predict_mil

            pred = predict_mil(self.mil, [emb])
            priority = float(1 / (1 + np.exp(-float(np.ravel(pred.logits)[0]))))
            attention = np.asarray(pred.attention[0], np.float32)
            source = "mil"
        else:
            focus = sum(v for k, v in counts.items() if k in ("epithelial", "inflammatory", "neoplastic",
                                                               "tumour", "lymphocyte"))
            density = focus / max(tissue_mm2, 1e-9)
            priority = fallback_priority(density)
            source = "fallback"
        fractions = {t: round(tile_tags.count(t) / max(len(tile_tags), 1), 4) for t in _TAG_COLOURS}

        outputs: dict[str, str] = {"features": str(factory.features.path_for(job))}
        if "cells" in self.config.outputs:
            data = ('{"type":"FeatureCollection","features":[' + ",".join(parts) + "]}\n").encode()
            del parts
            if self.config.gzip_cells:
                p = sdir / "cells.geojson.gz"
                data = gzip.compress(data, compresslevel=6, mtime=0)  # no timestamp: reruns are identical
            else:
                p = sdir / "cells.geojson"
            atomic_write_bytes(p, data)
            outputs["cells"] = str(p)
        if "regions" in self.config.outputs:
            p = sdir / "regions.geojson"
            atomic_write_json(p, _regions_geojson(grid, tags, namespace), indent=None)
            outputs["regions"] = str(p)
        if "thumbnail" in self.config.outputs:
            p = sdir / "overview.png"
            atomic_write_png(p, _overview(mask, grid, nuc.nuclei_per_tile, tile_tags, attention, title=name))
            outputs["thumbnail"] = str(p)
        timings = {**{k: round(v, 3) for k, v in done.timings.items()},
                   "finalise_s": round(time.perf_counter() - t0, 3)}
        result = SlideResult(path=str(job.path), name=name, tag=tags.slide.tag.value, reason=tags.slide.reason,
                             priority=round(priority, 6), priority_source=source, tiles=len(grid),
                             nuclei=len(cells), counts=counts, tag_fractions=fractions, outputs=outputs,
                             timings=timings, cells=cells)
        summary = {"run_key": key, "slide_fingerprint": job_fingerprint(job),
                   "result": {k: v for k, v in result.to_dict().items() if k != "cached"},
                   "tissue_mm2": round(tissue_mm2, 4), "nuclei_mpp": self.nuclei_mpp,
                   "focus_density_per_mm2": None if density is None else round(density, 2),
                   "regions": [{"tag": d.tag.value, "reason": d.reason} for d in tags.regions],
                   # JPEG tiles strictly re-decoded and the corrupt ones (level, col, row); a slide with any
                   # corrupt tile in what it read fails instead ("corrupt tiles"), so done slides list none
                   "tile_check": job.slide.tile_check() if job.slide is not None else None}
        outputs["summary"] = str(sdir / "summary.json")
        summary["result"]["outputs"] = outputs
        atomic_write_json(sdir / "summary.json", summary)  # last: marks the slide finished
        return result

    # -- the batch worklist --------------------------------------------------------------------------
    @staticmethod
    def _worklist(out: Path, results: list[Any], skipped: Sequence[tuple[str, str]] = ()) -> BatchResult:
        ok = [r for r in results if isinstance(r, SlideResult)]
        bad = [r for r in results if isinstance(r, Failure)]
        names = output_names([r.path for r in results])  # the names the batch wrote under (symmetric in order)
        ranked = sorted(ok, key=lambda r: (-r.priority, r.name))
        rows = []
        for rank, r in enumerate(ranked, 1):
            rows.append({"rank": rank, "slide": r.name, "path": r.path, "status": "done", "priority": r.priority,
                         "priority_source": r.priority_source, "tag": r.tag, "reason": r.reason,
                         "tiles": r.tiles, "nuclei": r.nuclei, "review_fraction": r.tag_fractions["review"],
                         "out_of_domain_fraction": r.tag_fractions["out_of_domain"]})
        for f in bad:
            rows.append({"rank": "", "slide": names.get(f.path, Path(f.path).stem), "path": f.path, "status": "failed",
                         "priority": "", "priority_source": "", "tag": "", "reason": f"{f.reason}: {f.message}",
                         "tiles": "", "nuclei": "", "review_fraction": "", "out_of_domain_fraction": ""})
        for path, why in skipped:
            rows.append({"rank": "", "slide": Path(path).name, "path": path, "status": "skipped",
                         "priority": "", "priority_source": "", "tag": "", "reason": why,
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


class _TriageFactory:
    """the scheduler's per-slide hooks for triage: open + grid, resume check, consumers"""

    def __init__(self, engine: Engine, out: Path, key: str, names: dict[str, str] | None = None) -> None:
        self.engine = engine
        self.out = out
        self.key = key
        self.names = names or {}
        self.blur: dict[int, np.ndarray] = {}
        runner = engine.model.runner
        from cellvit_optimus.engine import __version__
        from cellvit_optimus.engine.pipeline.extract import ExtractConfig

        cfg = ExtractConfig(tiling=engine.tiling, tissue=engine.config.tissue, scheduler=engine.config.scheduler,
                            mpp=engine.config.mpp, backend=engine.config.backend, decoder=engine.config.decoder)
        norm = {"mean": list(runner.preset.mean), "std": list(runner.preset.std), "dtype": runner.dtype}
        self.features = FeatureExtractor(out, cfg, runner.preset.name, runner.weights_id, runner.embed_dim,
                                         norm, __version__)
        self.features.names = self.names
        self.read_path = TileReadPath(cfg.decoder, str(runner.device))
        self.open_job = open_job_for(cfg, keep_mask=True, read_path=self.read_path)

    def name_of(self, job: SlideJob) -> str:
        from cellvit_optimus.engine.io import output_name

        return self.names.get(str(job.path)) or output_name(job.path)

    def prepare(self, job: SlideJob) -> dict[str, Any] | None:
        result = finished_result(self.out / self.name_of(job) / "summary.json", job.path, self.key,
                                 job_fingerprint(job))
        if result is not None:
            job.info.pop("_mask", None)
            return {"result": result}
        self.features.prepare(job)  # sets the feature cache key (and moves a damaged feature file aside)
        return None

    def consumers(self, job: SlideJob) -> list[Any]:
        writer = self.features.consumers(job)[0] if "features" in self.engine.config.outputs else None
        nuc = _NucleiConsumer(job, self.engine.post, self.engine.model.num_classes, self.engine.config.overlap_px,
                              tile_stats=self.engine.ood is not None and self.engine.ood.features != "embedding")
        self.blur[job.index] = np.full(len(job.grid), np.inf, np.float32)
        factory = self

        class _Both:
            def on_batch(self, batch: TileBatch) -> None:
                emb, _ = batch.output
                if writer is not None:
                    writer.writer.write(batch.indices, emb, batch.quality)
                factory.blur[job.index][batch.indices] = batch.quality["blur"]
                nuc.on_batch(batch)

            def finish(self, job: SlideJob) -> dict[str, Any]:
                info = writer.finish(job) if writer is not None else {}
                return {**info, "_job": job, "_nuclei": nuc, "_mask": job.info.get("_mask")}

            def abort(self, job: SlideJob) -> None:
                if writer is not None:
                    writer.abort(job)
                nuc.abort(job)

        return [_Both()]


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------


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


def finished_result(summary: Path, slide: Path, key: str | None, fingerprint: str) -> dict[str, Any] | None:
    """the resume rule: the recorded result when ``summary`` says this slide file (path and fingerprint)
    was finished under run ``key``, else None. A summary that cannot be read or is malformed is moved
    aside (warning naming it) so the slide is recomputed; one for another key, path or slide content
    is simply overwritten by the recomputation."""
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
                    summary, slide)
        return None
    return doc["result"]


def _file_hash(path: Path | None) -> str:
    if path is None:
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _mean_per_tile(values: np.ndarray | None, tile_of: list[int], n_tiles: int) -> np.ndarray | None:
    """mean of per-nucleus ``values`` over each tile's nuclei ``(n_tiles,)``; NaN for a tile without any"""
    if values is None:
        return None
    t = np.asarray(tile_of, np.int64)
    n = np.bincount(t, minlength=n_tiles).astype(np.float64)
    s = np.bincount(t, weights=np.asarray(values, np.float64), minlength=n_tiles)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / n, np.nan)


#: a long pure-Python loop in a worker thread pauses this long every _HAND_OFF_EVERY_S (see _GilHandOff)
_HAND_OFF_EVERY_S = 0.002
_HAND_OFF_PAUSE_S = 0.0002


class _GilHandOff:
    """call once per step of a long pure-Python loop run in a worker thread: every ``every_s`` of work
    it sleeps ``pause_s``, releasing the GIL with this thread off the CPU, so a thread waiting for the
    GIL (a host application's event loop) takes it at once. CPython's own hand-off (a drop request
    after the 5 ms switch interval) was not enough: beside the cells GeoJSON loop a 10 ms heartbeat
    was late by more than 80 ms in 5 of 22 runs (up to 187 ms); with these pauses by at most 22 ms
    in 18 runs, 70 ms in 11 more with a CPU-bound process competing for the 2 cores (issue 8).
    Costs ``pause_s / every_s`` (10 %) of the loop's time."""

    def __init__(self, every_s: float = _HAND_OFF_EVERY_S, pause_s: float = _HAND_OFF_PAUSE_S) -> None:
        self.every_s, self.pause_s = every_s, pause_s
        self.due = time.perf_counter() + every_s

    def __call__(self) -> None:
        if time.perf_counter() >= self.due:
            time.sleep(self.pause_s)
            self.due = time.perf_counter() + self.every_s


def _cells(nuc: _NucleiConsumer, profile: Any, tile_tags: list[str], set_sizes: np.ndarray | None,
           slide_dimensions: tuple[int, int], namespace: uuid.UUID,
           as_text: bool = True) -> tuple[CellTable, list[str]]:
    """the nuclei as written: a :class:`CellTable` and (``as_text``) each one's QuPath feature text
    (see :mod:`.geojson`): classification = type (none when unclassified), measurements = type
    probability, area and conformal type-set size, metadata = the trust tag of the nucleus' tile.
    Polygons are clipped to the slide; a nucleus with no area left is not written (nor counted)."""
    from cellvit_optimus.engine.geojson import closed_ccw, clip_ring, coords_feature_json, feature_id, ring_area_centroid

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
    hand_off = _GilHandOff()
    # batches may arrive in any order: list nuclei by tile (and, within a tile, as the kernel found them)
    for i in np.argsort(np.asarray(nuc.tile_of, np.int64), kind="stable").tolist():
        hand_off()
        ring = clip_ring(nuc.contours[i], W, H)
        coords = closed_ccw(ring) if ring is not None else None  # kernel contours are simple polygons
        if coords is None:
            continue
        t = nuc.types[i]
        known = 0 < t <= profile.num_classes
        tag = tile_tags[nuc.tile_of[i]]
        p = round(nuc.type_probs[i], 4)
        meas = {"type_prob": p, "area_px": round(nuc.areas[i], 2)}
        if set_sizes is not None:
            meas["type_set_size"] = int(set_sizes[i])
        fid = feature_id(coords, namespace)
        if as_text:
            parts.append(coords_feature_json(coords, profile.label(t) if known else None,
                                             profile.color(t) if known else None, meas, None, "detection",
                                             {"trust": tag}, namespace, fid=fid))
        ids.append(fid)
        rings.append(np.asarray(coords, np.float64))
        tid.append(t if known else 0)
        tile.append(nuc.tile_of[i])
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


def _regions_geojson(grid: Any, tags: Any, namespace: uuid.UUID) -> dict[str, Any]:
    """one QuPath annotation per region (8-connected tile group): union of its tiles' footprints,
    clipped to the slide, exteriors counter-clockwise (RFC 7946); tag as classification, reason as
    metadata, tile count as a measurement; locked, as machine-made annotations"""
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
                      "properties": {"objectType": "annotation", "name": f"{tag} region {r + 1}",
                                     "classification": {"name": tag, "color": list(_TAG_COLOURS[tag])},
                                     "isLocked": True,
                                     "measurements": {"tiles": float(len(members))},
                                     "metadata": {"trust": tag, "reason": dec.reason}}})
    return {"type": "FeatureCollection", "features": feats}


def _overview(mask: Any, grid: Any, nuclei_per_tile: np.ndarray, tile_tags: list[str],
              attention: np.ndarray | None, title: str = "") -> np.ndarray:
    """three titled panels (tissue + tiles, nuclei density or MIL attention, trust tags) with a legend
    under each: the tissue colours, a colour bar with its scale, the tag colours with tile counts"""
    base = draw_overlay(mask, None)
    h, w = base.shape[:2]
    dx, dy = mask.downsample
    dens = np.zeros((h, w), np.float32)
    tagimg = mask.thumbnail.astype(np.float32).copy()
    values = attention if attention is not None else nuclei_per_tile.astype(np.float32)
    vmax = float(values.max()) if len(values) and values.max() > 0 else 1.0
    w0, h0 = grid.level0_size
    for i, (x, y) in enumerate(grid.coords.tolist()):
        x0, y0 = int(x / dx), int(y / dy)
        x1, y1 = min(int((x + w0) / dx) + 1, w), min(int((y + h0) / dy) + 1, h)
        dens[y0:y1, x0:x1] = np.maximum(dens[y0:y1, x0:x1], values[i] / vmax)
        c = np.array(_TAG_COLOURS[tile_tags[i]], np.float32)
        tagimg[y0:y1, x0:x1] = 0.55 * mask.thumbnail[y0:y1, x0:x1] + 0.45 * c
    heat = np.where(dens[..., None] > 0, 0.4 * mask.thumbnail + 0.6 * _heat_colours(dens), mask.thumbnail)
    if attention is not None:
        scale = ("MIL attention", "0", f"{vmax:.3g} (max)")
    else:
        scale = ("nuclei per tile", "0", f"{vmax:.0f}")
    counts = {t: tile_tags.count(t) for t in _TAG_COLOURS}
    panels = [
        ("tissue and artefacts", base, [("tissue", (0, 200, 0)), ("pen / artefact", (230, 0, 0))], None),
        ("nuclei density" if attention is None else "MIL attention", heat, [], scale),
        ("trust tags", tagimg, [(f"{t.replace('_', ' ')} ({counts[t]})", c) for t, c in _TAG_COLOURS.items()],
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
        arr = img.clip(0, 255).astype(np.uint8)
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
