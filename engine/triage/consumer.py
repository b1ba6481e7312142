"""The triage fan-out consumer: what one slide's batches leave behind once the backbone and the nuclei
head have run on them.

Where it sits: the scheduler hands every computed batch (:class:`~.scheduler.BatchOutput`: embeddings
and nuclei maps) to :class:`TriageConsumer`, which feeds the feature writer (the extraction layout,
:class:`~.extract.FeatureConsumer`), records each tile's sharpness, and runs :class:`NucleiConsumer`:
HV post-processing of each batch as it arrives, keeping each nucleus in the one tile whose core (the
tile minus half the overlap on sides that have a neighbour) holds its centroid, so no slide-sized map
is ever held, plus per-tile uncertainty (NP/NT entropy, HV consistency) and nuclei counts. What a slide
hands on to :mod:`.finalise` is a :class:`SlideState` (the job, its :class:`NucleiRecords` and the
tiles' sharpness), kept by the engine's factory by job index, never inside the public
``SlideDone.consumer_facts``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cellvit_optimus.engine.pipeline import ConsumerFacts, SlideJob, TileBatch
from cellvit_optimus.kernels import smooth_ring

#: level-0 px per nuclei-grid px above which outlines are smoothed before scaling (a 40x slide under a
#: 0.5 um/px model: 2); at about 1 (a 20x slide) the traced outline is already at the slide's resolution
SMOOTH_ABOVE_SCALE = 1.25

if TYPE_CHECKING:
    from cellvit_optimus.engine.pipeline import FeatureConsumer, PostProcessConfig

__all__ = ("NucleiRecords", "NucleiConsumer", "SlideState", "TriageConsumer")


@dataclass
class NucleiRecords:
    """one slide's compact per-tile signals and per-nucleus records (level-0 coordinates)

    Per tile ``(n_tiles,)``: ``np_entropy``, ``nt_entropy``, ``hv_consistency`` (NaN until the tile is
    computed), ``nuclei_per_tile``; ``embeddings`` ``(n_tiles, D)`` once a batch arrived; ``tile_stats``
    ``(n_tiles, N_TILE_STATS)`` when the OOD recipe uses stain/sharpness statistics. Per nucleus, in
    arrival order: ``contours``, ``centroids``, ``types``, ``type_probs``, ``areas`` (level-0 px^2),
    ``tile_of`` (its tile); ``type_scores`` holds one ``(kept nuclei, C + 1)`` array per computed tile.
    """

    np_entropy: np.ndarray
    nt_entropy: np.ndarray
    hv_consistency: np.ndarray
    nuclei_per_tile: np.ndarray
    tile_stats: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    contours: list[np.ndarray] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    type_probs: list[float] = field(default_factory=list)
    type_scores: list[np.ndarray] = field(default_factory=list)
    areas: list[float] = field(default_factory=list)
    centroids: list[tuple[float, float]] = field(default_factory=list)
    tile_of: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, n_tiles: int, tile_stats: bool = False) -> NucleiRecords:
        stats = None
        if tile_stats:
            from cellvit_optimus.safety.ood_features import N_TILE_STATS

            stats = np.zeros((n_tiles, N_TILE_STATS), np.float32)
        return cls(np_entropy=np.full(n_tiles, np.nan, np.float32), nt_entropy=np.full(n_tiles, np.nan, np.float32),
                   hv_consistency=np.full(n_tiles, np.nan, np.float32),
                   nuclei_per_tile=np.zeros(n_tiles, np.int32), tile_stats=stats)


class NucleiConsumer:
    """post-processes batches as they arrive and keeps compact per-nucleus records only"""

    def __init__(self, job: SlideJob, post: PostProcessConfig, num_types: int, overlap: int,
                 tile_stats: bool = False) -> None:
        grid = job.grid
        assert grid is not None
        self.grid = grid
        self.post = post
        self.scale = grid.level0_size[0] / grid.tile_size  # level-0 px per nuclei-grid px
        # nuclei below the checkpoint's minimum area (um^2) are specks, never reported; the grid's pixel is
        # scale level-0 pixels, whose true size is the slide's MPP (target_mpp is met only to a tolerance)
        mpp0 = job.facts.mpp
        self.min_px = post.min_area_px(float(np.mean(mpp0)) * self.scale if mpp0 else grid.target_mpp)
        n = len(grid)
        self.n_tiles = n
        self.half = overlap / 2
        lattice = {tuple(g) for g in grid.grid_index.tolist()}
        # a side without a neighbour tile keeps its nuclei up to the tile edge
        self.open_side = np.array([[(c - 1, r) not in lattice, (c + 1, r) not in lattice,
                                    (c, r - 1) not in lattice, (c, r + 1) not in lattice]
                                   for c, r in grid.grid_index.tolist()], bool).reshape(-1, 4)
        # stain/sharpness statistics for the OOD feature, when the OOD state's recipe uses them
        self.records = NucleiRecords.empty(n, tile_stats=tile_stats)
        self.num_types = num_types

    def on_batch(self, batch: TileBatch) -> None:
        from cellvit_optimus.engine.pipeline import tile_to_instances
        from cellvit_optimus.safety import tile_uncertainty

        assert batch.output is not None and batch.output.nuclei is not None
        emb, maps = batch.output.embedding, batch.output.nuclei
        rec = self.records
        idx = batch.indices
        if rec.embeddings is None:
            rec.embeddings = np.zeros((self.n_tiles, emb.shape[1]), np.float32)
        rec.embeddings[idx] = emb
        if rec.tile_stats is not None:
            from cellvit_optimus.safety import tile_statistics

            tiles = batch.tiles if isinstance(batch.tiles, np.ndarray) else batch.tiles.cpu().numpy()  # GPU read path
            rec.tile_stats[idx] = tile_statistics(tiles)
        np_probs = np.stack([1.0 - maps.np, maps.np], axis=1)
        u = tile_uncertainty(np_probs, maps.nt, maps.hv)
        rec.np_entropy[idx], rec.nt_entropy[idx] = u.np_entropy, u.nt_entropy
        rec.hv_consistency[idx] = u.hv_consistency
        s = self.grid.tile_size
        p = self.post
        t_start, post_s = time.perf_counter(), 0.0
        for k, t in enumerate(idx.tolist()):
            t_tile = time.perf_counter()
            _, table = tile_to_instances(maps.np[k], maps.hv[k], maps.nt[k], p)  # the type prior applies here too
            post_s += time.perf_counter() - t_tile
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
                ring = np.asarray(table.contours[i], np.float64)
                if self.scale > SMOOTH_ABOVE_SCALE:  # a finer slide than the model's grid: no staircase
                    ring = smooth_ring(ring)
                rec.contours.append(ring * self.scale + (x0, y0))
                rec.centroids.append((x0 + cx * self.scale, y0 + cy * self.scale))
                rec.types.append(int(table.types[i]))
                rec.type_probs.append(float(table.type_probs[i]))
                rec.areas.append(float(table.areas[i]) * self.scale ** 2)
                rec.tile_of.append(t)
                kept += 1
                sel.append(i)
            rec.nuclei_per_tile[t] = kept
            if table.type_scores is not None:
                rec.type_scores.append(np.asarray(table.type_scores, np.float32)[sel])
        # post-processing (maps -> instances) and stitching (each nucleus to the tile whose core owns it),
        # per slide; one consumer call at a time per slide, so no lock is needed
        tm = batch.job.timings
        tm["postprocess_s"] = tm.get("postprocess_s", 0.0) + post_s
        tm["stitch_s"] = tm.get("stitch_s", 0.0) + (time.perf_counter() - t_start - post_s)

    def finish(self, job: SlideJob) -> ConsumerFacts:
        return {}  # the engine finalises the slide with the records collected here

    def abort(self, job: SlideJob) -> None:
        self.records.contours.clear()


@dataclass
class SlideState:
    """what finalising a computed slide needs beyond its public facts: the job (slide, grid, tissue
    mask), the nuclei records and each tile's sharpness (``inf`` until its batch arrives)"""

    job: SlideJob
    records: NucleiRecords
    blur: np.ndarray


class TriageConsumer:
    """one slide's fan-out: the feature file (when written), the tiles' sharpness and the nuclei

    ``states`` is the factory's per-slide state by job index: this slide's entry is dropped when the
    slide is aborted, so a failed slide's records are not held until the batch ends."""

    def __init__(self, state: SlideState, nuclei: NucleiConsumer, features: FeatureConsumer | None,
                 states: dict[int, SlideState]) -> None:
        self.state, self.nuclei, self.features, self.states = state, nuclei, features, states

    def on_batch(self, batch: TileBatch) -> None:
        if self.features is not None:
            self.features.on_batch(batch)
        self.state.blur[batch.indices] = batch.quality["blur"]
        self.nuclei.on_batch(batch)

    def finish(self, job: SlideJob) -> ConsumerFacts:
        return self.features.finish(job) if self.features is not None else {}

    def abort(self, job: SlideJob) -> None:
        self.states.pop(job.index, None)
        if self.features is not None:
            self.features.abort(job)
        self.nuclei.abort(job)
