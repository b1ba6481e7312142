"""The triage product: slides in, per-slide outputs and a ranked worklist out.

One streaming pass per slide through the scheduler: tissue tiles at the nuclei resolution (with
overlap) -> backbone (tile embeddings + token maps) -> UNETR head (NP/HV/NT maps) -> fan-out to

- the feature writer (``features/<slide>.h5``, the extraction layout; embeddings feed MIL and OOD),
- the nuclei consumer (:mod:`.consumer`): HV post-processing of each batch as it arrives, per-tile
  uncertainty and compact per-nucleus records, never a slide-sized map.

When a slide's last batch is in, :mod:`.finalise` turns its signals into trust tags per tile / region /
slide (shadow mode for a new site), the MIL score or the fallback priority, and the outputs of
:mod:`.outputs` (cells and regions GeoJSON for QuPath, an overview PNG, ``summary.json`` last). Every
file is written atomically; ``summary.json`` marks a finished slide, so a rerun skips it when its run
key, path and slide fingerprint (size, mtime, content samples) all match and every file it delivered
still matches its recorded checksum (:func:`~.outputs.finished_result`); an unreadable or malformed
summary, or a damaged output, is moved aside and the slide recomputed, and a slide that fails has its
earlier outputs moved aside (:func:`~.outputs.retire_outputs`). Slides are the files the OS resolves
(``os.path.realpath``: links and ``..`` followed, never collapsed as text). A run holds the output
folder's lock for its whole length (:func:`~.io.folder_lock`), and each slide writes under its
:func:`~.io.output_names` name, which cannot leave the folder, hit its reserved names or take over the
outputs of another slide (of this batch or an earlier one).

This module holds the :class:`Engine` (set-up, ``run`` and ``stream``) and re-exports the run's types
(:class:`TriageConfig`, :class:`SlideResult`, :class:`BatchResult`) and the fallback priority rule.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.io import (clean_stale_temporaries, escape_path, folder_lock, output_name,
                                       output_names)
from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.settings import REFERENCE_MPP, resolve_device
from cellvit_optimus.engine.pipeline import (BatchOutput, ConsumerFacts, ExtractConfig, Progress, SlideJob,
                                             TileReadPath, build_extractor, job_fingerprint, open_job_for,
                                             run_pipeline)
from cellvit_optimus.engine.triage.config import OUTPUTS, TriageConfig
from cellvit_optimus.engine.triage.consumer import NucleiConsumer, SlideState, TriageConsumer
from cellvit_optimus.engine.triage.finalise import (FALLBACK_DENSITY_HALF, PRIORITY_RULE, FinaliseContext,
                                                    fallback_priority, finalise_slide)
from cellvit_optimus.engine.triage.outputs import (finished_result, output_owner, retire_outputs,
                                                   write_worklist)
from cellvit_optimus.engine.triage.results import BatchResult, SlideResult
from cellvit_optimus.engine.wsi import Failure, TilingConfig

__all__ = ("TriageConfig", "SlideResult", "BatchResult", "Engine", "OUTPUTS", "FALLBACK_DENSITY_HALF",
           "fallback_priority")

log = logging.getLogger(__name__)


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
    batch_size : tiles per backbone call (default: the nuclei model's for the device, 4 on the CPU)
    head_dtype : ``"fp32"`` or ``"bf16"``: the nuclei decoder's precision (:class:`NucleiModel`); part
        of :meth:`run_key`, so a rerun in the other precision recomputes
    """

    def __init__(self, config: TriageConfig | None = None, *, nuclei_weights: str | os.PathLike[str] | None = None,
                 backbone_weights: str | os.PathLike[str] | None = None,
                 mil_weights: str | os.PathLike[str] | None = None, device: str = "cpu",
                 batch_size: int | None = None, head_dtype: str = "fp32") -> None:
        from cellvit_optimus.engine.pipeline import NucleiModel, PostProcessConfig

        self.config = config or TriageConfig()
        device = resolve_device(device)
        self.model = NucleiModel(nuclei_weights, backbone_weights=backbone_weights, device=device,
                                 batch_size=batch_size, head_dtype=head_dtype)
        from cellvit_optimus.heads.backbone import check_finite

        # NaN/inf weights would give all-NaN outputs that still look like a finished slide
        # (backbone weights files are checked as they load, in load_state_dict_file)
        check_finite(self.model.head, self.model.path or nuclei_weights, " (nuclei head)")
        self.nuclei_mpp = float(self.config.nuclei_mpp or self.model.nuclei_mpp)
        # the checkpoint's tuned post-processing; its sizes are HoVer-Net's at 0.25 um/px (40x)
        post = getattr(self.model, "post", None) or PostProcessConfig()
        self.post = post.scaled(REFERENCE_MPP / self.nuclei_mpp)
        self.mil = None
        if mil_weights is not None:
            from cellvit_optimus.heads.checkpoint import load_mil

            self.mil = load_mil(mil_weights, backbone_id=self.model.runner.preset.name,
                                backbone_hash=self.model.runner.weights_id).model
            check_finite(self.mil, mil_weights, " (MIL head)")
        self._model_hash = _file_hash(self.model.path) if self.model.path else "in-memory"
        self.thresholds = self._load_thresholds()
        self.ood = self._load_ood()
        self.tiling = TilingConfig(tile_size=self.model.tile_size, target_mpp=self.nuclei_mpp,
                                   overlap=self.config.overlap_px / self.model.tile_size,
                                   min_tissue_fraction=self.config.min_tissue_fraction)
        self.conformal = self._load_conformal()
        #: seconds to sleep before every backbone batch (0: none); see :meth:`forward`
        self.batch_delay_s = 0.0
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

        if self.config.safety.thresholds_path:
            return TagThresholds.load(self.config.safety.thresholds_path)
        return TagThresholds(require_ood=False)  # conservative defaults; OOD judged when a state exists

    def _state_path(self, configured: str | None, bundled_name: str) -> str | None:
        """a safety state file: the configured one, else the bundled one when the bundled model runs, from
        the package or as a copy of the same file elsewhere (states are bound to their model's content;
        another model gets none by default)"""
        if configured is not None:
            return configured
        from cellvit_optimus.engine.data import DATA_DIR
        from cellvit_optimus.engine.pipeline import default_model_path

        bundled = DATA_DIR / bundled_name
        if not bundled.is_file() or self.model.path is None:
            return None
        # the package's own file needs no second read; a copy elsewhere is compared by content
        if (self.model.path.parent == DATA_DIR
                or self._model_hash == _bundled_model_hash(default_model_path())):
            return str(bundled)
        return None

    def _load_ood(self):
        from cellvit_optimus.safety import MahalanobisOOD

        path = self._state_path(self.config.safety.ood_state_path, "default_ood.npz")
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

    def _load_conformal(self):
        """the nucleus-type calibration: the config's file, or the bundled one for the bundled model"""
        from cellvit_optimus.safety import SplitConformal

        path = self._state_path(self.config.safety.conformal_state_path, "default_nuclei_conformal.json")
        self._conformal_hash = _file_hash(Path(path)) if path is not None else None
        if path is None:
            return None
        cp = SplitConformal.load(path, model_id=self._model_hash, backbone_id=self.model.runner.preset.name,
                                 weights_hash=self.model.runner.weights_id)
        if cp.n_classes != self.model.num_classes:
            raise ConfigError(f"{path}: calibrated for {cp.n_classes} nucleus types, the model has "
                              f"{self.model.num_classes}")
        return cp

    def run_key(self) -> str:
        """identity of everything that shapes a slide's outputs (a rerun with another key recomputes)"""
        return hashlib.sha256(json.dumps(self._key_doc(), sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _key_doc(self) -> dict[str, Any]:
        """what :meth:`run_key` hashes"""
        # the model by content only: a copy of the same file elsewhere (another node's install, a moved
        # cache) gives the same key, so finished slides are not recomputed and Ray actors agree
        doc = {"model_hash": self._model_hash,
               "backbone": self.model.runner.weights_id, "tiling": asdict(self.tiling),
               "tissue": asdict(self.config.tissue), "mpp": self.config.mpp, "post": asdict(self.post),
               "thresholds": _key_thresholds(self.thresholds), "outputs": list(self.config.outputs),
               "mil": self.mil is not None, "ood": self._ood_hash, "conformal": self._conformal_hash,
               "priority_rule": PRIORITY_RULE,
               # 2: QuPath fields in measurements / metadata, UUID ids, geometry clipped to the slide;
               # 3: trust_level measurement and the reason in region names (QuPath 0.4 drops metadata)
               "geojson": 3, "gzip_cells": self.config.gzip_cells}
        if self.model.head_dtype != "fp32":  # fp32 runs keep the keys they had before the option existed
            doc["head_dtype"] = self.model.head_dtype
        return doc

    # -- running -----------------------------------------------------------------------------------
    def run(self, slides: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
            progress: Callable[[Progress], None] | None = None,
            skipped: Sequence[tuple[str, str]] = ()) -> BatchResult:
        """triage ``slides`` into ``out_dir``; returns the batch with its worklist (``skipped``: inputs
        not run, as ``(path, why)``, listed in the worklist too)

        Works from plain code and from inside a running event loop (a notebook): the work then runs
        on its own loop in a worker thread while this call waits (see :mod:`.aio`)."""
        from cellvit_optimus.engine.pipeline import run_sync

        out = Path(os.path.realpath(out_dir))
        order: dict[str, int] = {}
        for i, p in enumerate(slides):
            order.setdefault(os.path.realpath(p), i)  # results name the real path

        async def main() -> BatchResult:
            async with self._own_folder(out):  # the worklist too is written under the folder's lock
                paths, names = await anyio.to_thread.run_sync(_plan, slides, out, None)
                got: list[SlideResult | Failure] = []
                try:
                    async for r in self._stream_locked(paths, out, progress, names):
                        got.append(r)
                except anyio.get_cancelled_exc_class():
                    # Ctrl-C (asyncio cancels the run, then raises KeyboardInterrupt): the worklist still
                    # says what finished, and lists the rest as interrupted; a rerun resumes them
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(write_worklist, out, _with_interrupted(got, paths),
                                                       skipped, names)
                    raise
                got.sort(key=lambda r: order.get(r.path, len(order)))
                return await anyio.to_thread.run_sync(lambda: write_worklist(out, got, skipped, names))

        return run_sync(main)

    @contextlib.asynccontextmanager
    async def _own_folder(self, out: Path) -> AsyncIterator[None]:
        """hold ``out``'s lock (waiting in a thread: the host's loop runs on) and clean what dead runs left"""
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
        out = Path(os.path.realpath(out_dir))
        if clean_temporaries:
            async with self._own_folder(out):
                paths, batch_names = await anyio.to_thread.run_sync(_plan, slides, out, names)
                async for r in self._stream_locked(paths, out, progress, batch_names):
                    yield r
        else:
            await anyio.to_thread.run_sync(lambda: out.mkdir(parents=True, exist_ok=True))
            paths, batch_names = await anyio.to_thread.run_sync(_plan, slides, out, names)
            async for r in self._stream_locked(paths, out, progress, batch_names):
                yield r

    async def _stream_locked(self, paths: list[Path], out: Path, progress: Callable[[Progress], None] | None,
                             names: dict[str, str]) -> AsyncIterator[SlideResult | Failure]:
        from cellvit_optimus.engine.wsi import failure_from

        position = {str(p): i for i, p in enumerate(paths)}
        key = self.run_key()
        factory = _TriageFactory(self, out, key, names)
        pending: dict[int, Any] = {}
        next_index = 0

        ctx = FinaliseContext(config=self.config, thresholds=self.thresholds, profile=self.model.profile,
                              nuclei_mpp=self.nuclei_mpp, ood=self.ood, conformal=self.conformal, mil=self.mil)

        async def settle(r: Any) -> SlideResult | Failure:
            if isinstance(r, Failure):
                await anyio.to_thread.run_sync(factory.retire, r.path)
                return r
            if r.cached:
                return SlideResult(**factory.finished.pop(r.index), cached=True)
            state = factory.slides.pop(r.index)
            try:
                return await anyio.to_thread.run_sync(finalise_slide, ctx, state, r.timings, out, key,
                                                      factory.name_of(state.job),
                                                      str(factory.features.path_for(state.job)))
            except Exception as exc:  # one slide's outputs failing must not stop the batch
                log.info("%s: finalising failed: %s", r.path, exc)  # reported as the slide's Failure
                failure = failure_from(r.path, exc)
                await anyio.to_thread.run_sync(factory.retire, r.path)
                return failure

        async with run_pipeline(paths, open_job=factory.open_job, factory=factory, compute=self.forward,
                                config=self.config.scheduler, read_tiles=factory.read_path.read,
                                progress=progress) as results:
            async for r in results:
                pending[position[str(Path(r.path))]] = r
                while next_index in pending:
                    yield await settle(pending.pop(next_index))
                    next_index += 1

    def forward(self, tiles: np.ndarray) -> BatchOutput:
        """embeddings (B, D) float32 and nuclei maps of uint8 tiles: one backbone pass feeds both

        The scheduler's ``compute``. ``batch_delay_s`` > 0 sleeps that long before each batch: a
        diagnostics and test hook (a slow backbone on demand, e.g. to kill a Ray actor mid-slide)."""
        if self.batch_delay_s > 0:
            time.sleep(self.batch_delay_s)
        emb, maps = self.model.forward(tiles)
        return BatchOutput(emb, nuclei=maps)


class _TriageFactory:
    """the scheduler's per-slide hooks for triage: open + grid, resume check, consumers; keeps each
    computed slide's :class:`~.consumer.SlideState` by job index until the engine finalises it"""

    def __init__(self, engine: Engine, out: Path, key: str, names: dict[str, str] | None = None) -> None:
        self.engine = engine
        self.out = out
        self.key = key
        self.names = names or {}
        self.slides: dict[int, SlideState] = {}
        #: the summary's result of each slide a rerun serves whole, by job index, until it is settled
        self.finished: dict[int, dict[str, object]] = {}
        self.feature_keys: dict[str, str] = {}  # str(path) -> cache key of its feature file in this run
        runner = engine.model.runner
        cfg = ExtractConfig(tiling=engine.tiling, tissue=engine.config.tissue, scheduler=engine.config.scheduler,
                            mpp=engine.config.mpp, backend=engine.config.backend, decoder=engine.config.decoder)
        self.features = build_extractor(runner, out, cfg)
        self.features.names = self.names
        self.read_path = TileReadPath(cfg.decoder, str(runner.device))
        self.open_job = open_job_for(cfg, keep_mask=True, read_path=self.read_path)

    def name_of(self, job: SlideJob) -> str:
        return self.name_of_path(str(job.path))

    def name_of_path(self, path: str) -> str:
        return self.names.get(path) or output_name(path)

    def prepare(self, job: SlideJob) -> ConsumerFacts | None:
        summary = self.out / self.name_of(job) / "summary.json"
        result = finished_result(summary, job.path, self.key, job_fingerprint(job))
        if result is not None:
            job.mask = None
            self.finished[job.index] = result
            return {"summary": str(summary)}
        self.features.prepare(job)  # sets the feature cache key (and moves a damaged feature file aside)
        cache_key = job.facts.cache_key
        assert cache_key is not None  # FeatureExtractor.prepare noted it
        self.feature_keys[str(job.path)] = cache_key
        _warn_if_upsampled(job, self.engine.nuclei_mpp)
        return None

    def retire(self, path: str) -> None:
        """the slide at ``path`` failed: none of its earlier outputs may look current (its feature file
        stays only if this run wrote it for the slide as it is now; never raises)"""
        retire_outputs(self.out, self.name_of_path(path), path, self.feature_keys.get(path))

    def consumers(self, job: SlideJob) -> list[TriageConsumer]:
        assert job.grid is not None
        engine = self.engine
        writer = self.features.consumers(job)[0] if "features" in engine.config.outputs else None
        nuc = NucleiConsumer(job, engine.post, engine.model.num_classes, engine.config.overlap_px,
                             tile_stats=engine.ood is not None and engine.ood.features != "embedding")
        state = SlideState(job, nuc.records, np.full(len(job.grid), np.inf, np.float32))
        self.slides[job.index] = state
        return [TriageConsumer(state, nuc, writer, self.slides)]


def _plan(slides: Sequence[str | os.PathLike[str]], out: Path,
          names: Mapping[str, str] | None) -> tuple[list[Path], dict[str, str]]:
    """the batch as the files the OS reads (``realpath``; each once) and their output names: ``names``
    where given (keyed by any spelling of the path), else :func:`~.io.output_names`, which leaves the
    outputs of another slide in ``out`` (an earlier batch) where they are. Run under the folder's lock."""
    paths: list[Path] = []
    first: dict[str, str] = {}
    for p in slides:
        rp = os.path.realpath(p)
        if rp in first:  # the same file twice would write its outputs twice at once
            log.warning("%s: the same file as %s; triaged once", escape_path(p), escape_path(first[rp]))
            continue
        first[rp] = str(p)
        paths.append(Path(rp))
    if names is not None:
        given = {os.path.realpath(k): v for k, v in names.items()}
        return paths, {str(p): given.get(str(p)) or output_name(p) for p in paths}
    return paths, output_names(paths, functools.partial(output_owner, out))


#: a slide scanned this many times coarser than the nuclei model's resolution is warned about: its tiles
#: are upsampled that much, and nuclei a few pixels wide carry no detail the model was trained on
UPSAMPLE_WARN = 1.5


def _warn_if_upsampled(job: SlideJob, nuclei_mpp: float) -> None:
    mpp = job.slide.mpp if job.slide is not None else None
    if not mpp:
        return
    factor = min(mpp) / nuclei_mpp
    if factor >= UPSAMPLE_WARN:
        log.warning("%s: scanned at %.3g um/px, %.1fx coarser than the nuclei model's %.3g um/px: %d tiles "
                    "are upsampled %.1fx, and its nuclei and tags are unreliable", job.path, min(mpp), factor,
                    nuclei_mpp, len(job.grid) if job.grid is not None else 0, factor)


def _with_interrupted(got: Sequence[SlideResult | Failure],
                      slides: Sequence[str | os.PathLike[str]]) -> list[SlideResult | Failure]:
    """the results so far, then every input without one as a Failure with reason ``interrupted``"""
    done = {r.path for r in got}
    rest: list[SlideResult | Failure] = []
    for p in dict.fromkeys(os.path.abspath(p) for p in slides):
        if p not in done:
            rest.append(Failure(path=p, error="KeyboardInterrupt", reason="interrupted", message=f"{p}: not "
                                "finished when the run was interrupted (a rerun resumes it)"))
    return [*got, *rest]


def _key_thresholds(thresholds: Any) -> JsonDict:
    """the thresholds as the run key lists them: the quality-flag limits only when they differ from
    the values built into the engine before they became thresholds, so that slides finished by
    earlier runs keep their key (and are not recomputed) while a changed limit still recomputes"""
    doc = asdict(thresholds)
    for f in fields(thresholds):
        if f.name in ("artefact_flag_fraction", "blur_flag_min") and doc[f.name] == f.default:
            del doc[f.name]
    return doc


@functools.lru_cache(maxsize=4)
def _bundled_model_hash(path: Path) -> str:
    """:func:`_file_hash` of the bundled checkpoint (read once per process)"""
    return _file_hash(path) if Path(path).is_file() else ""


def _file_hash(path: Path | None) -> str:
    if path is None:
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
