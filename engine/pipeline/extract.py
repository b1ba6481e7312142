"""Feature extraction: every tissue tile of every slide through the backbone into one HDF5 per slide.

``extract_features`` (sync) and ``aextract_features`` (async iterator, for a host event loop) run the
scheduler with a :class:`FeatureExtractor` as the fan-out consumer. The files under ``out/features/``
are the versioned embedding cache: a rerun whose key matches (backbone, weights hash, preprocessing,
resolution, package version, slide fingerprint) does no backbone work for that slide.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.jsondoc import JsonDict
from cellvit_optimus.engine.pipeline.features import (FeatureWriter, cache_key, coords_attributes,
                                                      preprocessing_hash, verify_features)
# the read path moved to readpath.py; its names stay importable from here (public API)
from cellvit_optimus.engine.pipeline.readpath import (DECODERS, Decoder, TileReadPath, job_fingerprint,
                                                      open_job_for)
from cellvit_optimus.engine.pipeline.scheduler import (BatchOutput, ConsumerFacts, Progress, SchedulerConfig,
                                                       SlideDone, SlideJob, TileBatch, run_pipeline)
from cellvit_optimus.engine.wsi import TilingConfig, TissueConfig
from cellvit_optimus.engine.io import (clean_stale_temporaries, escape_path, folder_lock, move_aside,
                                       output_name, output_names)

if TYPE_CHECKING:
    from cellvit_optimus.engine.pipeline.runner import BackboneRunner
    from cellvit_optimus.engine.wsi import BackendName, Failure

__all__ = ("DECODERS", "ExtractConfig", "FeatureConsumer", "FeatureExtractor", "TileReadPath", "build_extractor",
           "extract_features", "aextract_features", "feature_path", "open_job_for")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """what to tile and how: composed from the subsystem configs"""

    tiling: TilingConfig = field(default_factory=TilingConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    mpp: float | None = None  # level-0 MPP override for slides without (or with wrong) metadata
    backend: BackendName = "auto"
    decoder: Decoder = "auto"  # tile read path: one of DECODERS (see TileReadPath)

    def __post_init__(self) -> None:
        if self.mpp is not None and not 0.05 <= self.mpp <= 50:
            raise ConfigError(f"mpp={self.mpp} outside 0.05..50 um/px")
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder={self.decoder!r} is not one of {', '.join(DECODERS)}")


def feature_path(out_dir: str | os.PathLike[str], slide: str | os.PathLike[str], name: str | None = None) -> Path:
    """``out_dir/features/<name>.h5``; ``name`` defaults to the slide's :func:`~.io.output_name`"""
    return Path(out_dir) / "features" / f"{name or output_name(slide)}.h5"


class FeatureConsumer:
    """one slide's feature file: each batch's embeddings and tile quality streamed into its writer,
    committed when the slide finishes, removed when it is aborted"""

    def __init__(self, writer: FeatureWriter) -> None:
        self.writer = writer

    def on_batch(self, batch: TileBatch) -> None:
        assert batch.output is not None  # the scheduler feeds consumers computed batches only
        emb = batch.output.embedding
        # the backbone's tensor (on its device) or the nuclei model's numpy embeddings
        emb = emb.detach().float().cpu().numpy() if hasattr(emb, "detach") else np.asarray(emb, np.float32)
        self.writer.write(batch.indices, emb, batch.quality)

    def finish(self, job: SlideJob) -> ConsumerFacts:
        return {"features": str(self.writer.commit())}

    def abort(self, job: SlideJob) -> None:
        self.writer.abort()


class FeatureExtractor:
    """scheduler fan-out for feature files: cache check per slide, one streaming writer per slide"""

    def __init__(self, out_dir: str | os.PathLike[str], config: ExtractConfig, backbone_id: str,
                 weights_hash: str, embed_dim: int, normalisation: JsonDict, version: str) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self.backbone_id = backbone_id
        self.weights_hash = weights_hash
        self.embed_dim = embed_dim
        self.preprocessing = {"tiling": asdict(config.tiling), "tissue": asdict(config.tissue),
                              "mpp_override": config.mpp, "normalisation": normalisation}
        self.version = version
        self.names: dict[str, str] = {}  # str(slide path) -> output name, set per batch (io.output_names)

    def path_for(self, job: SlideJob) -> Path:
        return feature_path(self.out_dir, job.path, self.names.get(str(job.path)))

    def key_for(self, job: SlideJob) -> str:
        return cache_key(backbone=self.backbone_id, weights_hash=self.weights_hash,
                         preprocessing=self.preprocessing, slide=job_fingerprint(job),
                         version=self.version)

    def prepare(self, job: SlideJob) -> ConsumerFacts | None:
        import h5py


        key = self.key_for(job)
        job.note(cache_key=key)
        dest = self.path_for(job)
        if not dest.exists():
            return None
        problem = verify_features(dest)
        if problem is not None:
            move_aside(dest, problem)  # a damaged cache file is never served, and never silently lost
            return None
        try:
            with h5py.File(dest, "r") as f:
                hit = f.attrs.get("cache_key") == key
        except OSError:  # vanished or replaced meanwhile: recompute
            return None
        if hit:
            return {"features": str(dest)}
        return None  # another key (model, preprocessing, slide changed): rewritten by this run

    def consumers(self, job: SlideJob) -> list[FeatureConsumer]:
        grid, slide = job.grid, job.slide
        assert grid is not None and slide is not None
        attrs = {
            "patch_size": grid.tile_size,
            "patch_size_level0": int(grid.level0_size[0]),
            "patch_size_level0_xy": list(grid.level0_size),
            "stride_level0": list(grid.stride),
            "target_mpp": grid.target_mpp,
            "mpp": list(slide.mpp) if slide.mpp else [],
            "mpp_source": slide.mpp_source,
            "slide_dimensions": list(slide.dimensions),
            "backbone": self.backbone_id,
            "weights_hash": self.weights_hash,
            "preprocessing_hash": preprocessing_hash(self.preprocessing),
            "cache_key": job.facts.cache_key,
            "slide_fingerprint": job_fingerprint(job),
            # escaped: HDF5 strings are UTF-8, a file name need not be (io.escape_path)
            "slide_name": escape_path(job.path.name),
            "slide_path": escape_path(job.path),  # whose outputs these are (io.output_names)
            "package_version": self.version,
            "decoder": job.facts.decoder or "slide",
        }
        arrays = {"coords": grid.coords.astype(np.int64), "grid_index": grid.grid_index.astype(np.int64),
                  "tissue_fraction": grid.tissue_fraction, "artefact_fraction": grid.artefact_fraction}
        # Trident and CLAM read the patch geometry from the coords dataset, not the file root; the name
        # is the file's own (the sanitised output name), which is what a reader pairs it with
        dest = self.path_for(job)
        on_coords = coords_attributes(name=dest.stem, tile_size=grid.tile_size, target_mpp=grid.target_mpp,
                                      level0_size=grid.level0_size, stride=grid.stride,
                                      slide_dimensions=slide.dimensions, mpp=slide.mpp)
        writer = FeatureWriter(dest, len(grid), self.embed_dim, attrs, arrays, {"coords": on_coords})
        return [FeatureConsumer(writer)]


def build_extractor(runner: BackboneRunner, out_dir: str | os.PathLike[str], config: ExtractConfig) -> FeatureExtractor:
    """the :class:`FeatureExtractor` for ``runner``'s features under ``out_dir``: feature extraction
    and triage both build theirs here, so the two write the same cache key for the same slide

    The normalisation in the key names the stain normaliser only when the runner has one. (Triage
    never listed it and extraction listed ``None``: one rule keeps triage's existing feature files
    valid, and extraction's caches written without a normaliser are recomputed once.)"""
    from cellvit_optimus.engine import __version__

    norm: JsonDict = {"mean": list(runner.preset.mean), "std": list(runner.preset.std), "dtype": runner.dtype}
    if runner.stain_norm is not None:
        norm["stain_norm"] = getattr(runner.stain_norm, "__name__", None)
    return FeatureExtractor(Path(out_dir), config, runner.preset.name, runner.weights_id, runner.embed_dim, norm,
                            __version__)


async def aextract_features(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                            runner: BackboneRunner, config: ExtractConfig | None = None,
                            progress: Callable[[Progress], None] | None = None, *,
                            lock_timeout_s: float | None = None) -> AsyncIterator[SlideDone | Failure]:
    """async stream of per-slide results (as slides finish); safe inside a host asyncio/anyio loop

    The run holds the output folder's lock (:func:`~.io.folder_lock`; a second run waits up to
    ``lock_timeout_s``, default as long as it takes). Slides are written as :func:`~.io.output_names`.
    """
    from cellvit_optimus.engine.pipeline.features import feature_owner

    config = config or ExtractConfig()
    # each slide as the file the OS reads (links and ".." resolved), and the same file once: twice
    # would write one feature file twice at once
    slides = list(dict.fromkeys(Path(os.path.realpath(p)) for p in paths))
    out = Path(out_dir)
    extractor = build_extractor(runner, out, config)
    read_path = TileReadPath(config.decoder, str(runner.device))

    def compute(tiles: np.ndarray) -> BatchOutput:
        out = runner(tiles, tokens=False)
        return BatchOutput(out.embedding, spans=getattr(out, "spans", ()))

    lock = folder_lock(out, lock_timeout_s)
    await anyio.to_thread.run_sync(lock.__enter__)  # waiting for another run never blocks the host's loop
    try:
        await anyio.to_thread.run_sync(clean_stale_temporaries, out / "features")
        # under the lock: a name whose feature file is another slide's (an earlier batch) is not taken over
        extractor.names = await anyio.to_thread.run_sync(
            lambda: output_names(slides, lambda n: feature_owner(out / "features" / f"{n}.h5")))
        async with run_pipeline(slides, open_job=open_job_for(config, read_path=read_path), factory=extractor,
                                compute=compute, config=config.scheduler, read_tiles=read_path.read,
                                progress=progress) as results:
            async for r in results:
                yield r
    finally:
        lock.__exit__(None, None, None)


def extract_features(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                     runner: BackboneRunner, config: ExtractConfig | None = None,
                     progress: Callable[[Progress], None] | None = None) -> list[SlideDone | Failure]:
    """synchronous :func:`aextract_features`; results in input order (also callable inside a running
    event loop, e.g. a notebook: the work then runs on its own loop in a worker thread)"""
    from cellvit_optimus.engine.pipeline.aio import run_sync

    async def main() -> list[Any]:
        return [r async for r in aextract_features(paths, out_dir, runner, config, progress)]

    results = run_sync(main)
    order: dict[str, int] = {}
    for i, p in enumerate(paths):
        order.setdefault(os.path.realpath(p), i)  # results name the real path
    return sorted(results, key=lambda r: order.get(str(r.path), len(order)))
