"""Feature extraction: every tissue tile of every slide through the backbone into one HDF5 per slide.

``extract_features`` (sync) and ``aextract_features`` (async iterator, for a host event loop) run the
scheduler with a :class:`FeatureExtractor` as the fan-out consumer. The files under ``out/features/``
are the versioned embedding cache: a rerun whose key matches (backbone, weights hash, preprocessing,
resolution, package version, slide fingerprint) does no backbone work for that slide.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellvit_optimus.engine.errors import ConfigError
from cellvit_optimus.engine.pipeline.features import (FeatureWriter, cache_key, coords_attributes, preprocessing_hash,
                       slide_fingerprint, verify_features)
from cellvit_optimus.engine.pipeline.scheduler import Progress, SchedulerConfig, SlideDone, SlideJob, TileBatch, run_pipeline
from cellvit_optimus.engine.wsi.tissue import TilingConfig, TissueConfig, tile_grid

if TYPE_CHECKING:
    from cellvit_optimus.engine.wsi.inspect import Failure
    from cellvit_optimus.engine.pipeline.runner import BackboneRunner

__all__ = ("DECODERS", "ExtractConfig", "FeatureExtractor", "TileReadPath", "extract_features",
           "aextract_features", "feature_path", "open_job_for")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """what to tile and how: composed from the subsystem configs"""

    tiling: TilingConfig = field(default_factory=TilingConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    mpp: float | None = None  # level-0 MPP override for slides without (or with wrong) metadata
    backend: str = "auto"
    decoder: str = "auto"  # tile read path: one of DECODERS (see TileReadPath)

    def __post_init__(self) -> None:
        if self.mpp is not None and not 0.05 <= self.mpp <= 50:
            raise ConfigError(f"mpp={self.mpp} outside 0.05..50 um/px")
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder={self.decoder!r} is not one of {', '.join(DECODERS)}")


#: tile read paths: "auto" (the GPU path when the backbone runs on CUDA, a GPU decoder is installed, the
#: slide's tiles are JPEG and the GPU path measures faster on the first such slide; else the slide
#: reader), "slide" (the slide reader on the host: cuCIM, tiffslide, ...), "dali" / "cucim" (that GPU
#: decoder, for every slide it can read), "reference" (the GPU path's logic with the host JPEG decoder:
#: raw tile streams, assembly and resampling in torch, on the backbone's device; for tests)
DECODERS: tuple[str, ...] = ("auto", "slide", "dali", "cucim", "reference")


class TileReadPath:
    """turns a slide job's tile coordinates into pixels for the scheduler's reader threads: the slide
    reader on the host, or raw JPEG tiles decoded on the GPU (:mod:`.gpu_decode`), chosen per slide.

    ``attach`` (called by the slide opener) picks the path and records it in ``job.info["decoder"]``
    with the reason; ``read`` is the scheduler's ``read_tiles``. On the GPU path tiles stay on the device
    as a uint8 torch tensor, which the runner takes without a host round trip; tile quality is computed
    there too. Slides the GPU path cannot read (JPEG 2000, DICOM, untiled) use the slide reader.
    """

    def __init__(self, decoder: str = "auto", device: str = "cpu") -> None:
        if decoder not in DECODERS:
            raise ConfigError(f"decoder={decoder!r} is not one of {', '.join(DECODERS)}")
        self.decoder = decoder
        self.device = str(device)
        self._auto: tuple[bool, str] | None = None  # "auto": measured once per run, on the first JPEG slide
        self._lock = threading.Lock()

    def attach(self, job: SlideJob) -> None:
        from cellvit_optimus.engine.errors import BackendUnavailableError, UnsupportedFormatError
        from cellvit_optimus.engine.wsi.gpu_decode import GpuTileReader, choose_decoder

        slide, grid = job.slide, job.grid
        assert slide is not None and grid is not None
        on_cuda = self.device.startswith("cuda")
        if self.decoder == "slide" or (self.decoder == "auto" and not on_cuda) or not len(grid):
            why = "asked for" if self.decoder == "slide" else "no tiles" if not len(grid) else "backbone not on CUDA"
            job.info.update(decoder="slide", decoder_reason=why)
            return
        name = {"auto": "auto", "dali": "dali", "cucim": "cucim", "reference": "cpu"}[self.decoder]
        try:
            reader = GpuTileReader(slide, decoder=name, device=self.device)  # type: ignore[arg-type]
        except UnsupportedFormatError as exc:
            job.info.update(decoder="slide", decoder_reason=f"GPU read path cannot read this slide: {exc}")
            return
        except BackendUnavailableError as exc:
            if self.decoder != "auto":
                raise  # asked for by name: the slide fails with the message naming the package
            job.info.update(decoder="slide", decoder_reason=f"GPU decode unavailable: {exc}")
            return
        except Exception as exc:  # noqa: BLE001  a decoder that fails to start (DALI pipeline, cuCIM)
            if self.decoder != "auto":
                raise
            job.info.update(decoder="slide", decoder_reason=f"GPU decoder failed to start: {type(exc).__name__}: "
                            f"{exc}".splitlines()[0])
            return
        if self.decoder == "auto":
            with self._lock:
                if self._auto is None:
                    locs = [tuple(c) for c in grid.coords[:256].tolist()]
                    choice = choose_decoder(slide, locs, grid.tile_size, grid.target_mpp, gpu_reader=reader)
                    self._auto = (choice.decoder == "gpu", choice.reason)
                    log.info("%s: tile read path %s (%s)", job.path.name, choice.decoder, choice.reason)
            use, why = self._auto
            if not use:
                reader.close()
                job.info.update(decoder="slide", decoder_reason=why)
                return
        else:
            why = "asked for"
        job.reader = reader
        job.info.update(decoder=reader.decoder if self.decoder != "reference" else "reference",
                        decoder_reason=why)

    def read(self, job: SlideJob, idx: np.ndarray) -> tuple[Any, dict[str, np.ndarray]]:
        from cellvit_optimus.engine.wsi.tissue import tile_quality

        grid = job.grid
        assert job.slide is not None and grid is not None
        locs = [tuple(c) for c in grid.coords[idx].tolist()]
        source = job.reader if job.reader is not None else job.slide
        if job.reader is not None:  # GPU decoders return damaged pixels silently too: same strict check
            job.slide.check_tiles(locs, grid.tile_size, grid.target_mpp)
        tiles = source.read_tiles(locs, grid.tile_size, grid.target_mpp)
        fallback = getattr(job.reader, "fallback_reason", None)
        if fallback is not None:  # the GPU decoder failed on some batches: the host reader read them
            job.info.update(decoder_fallback=fallback, decoder_fallbacks=job.reader.fallbacks)
        return tiles, tile_quality(tiles)


def feature_path(out_dir: str | os.PathLike[str], slide: str | os.PathLike[str], name: str | None = None) -> Path:
    """``out_dir/features/<name>.h5``; ``name`` defaults to the slide's :func:`~.io.output_name`"""
    from cellvit_optimus.engine.io import output_name

    return Path(out_dir) / "features" / f"{name or output_name(slide)}.h5"


def job_fingerprint(job: SlideJob) -> str:
    """the slide's fingerprint with its mtime (cache and finished-slide keys), computed once per job"""
    fp = job.info.get("slide_fingerprint")
    if fp is None:
        fp = job.info["slide_fingerprint"] = slide_fingerprint(job.path, mtime=True)
    return fp


def open_job_for(config: ExtractConfig, keep_mask: bool = False,
                 read_path: TileReadPath | None = None) -> Callable[[SlideJob], None]:
    """the scheduler's slide opener for ``config``: open, tissue grid, facts for the result
    (``keep_mask`` also keeps the tissue mask in ``job.info["_mask"]``, for overview images;
    ``read_path`` picks the slide's tile read path, whose ``read`` the scheduler then uses)"""
    from cellvit_optimus.engine.wsi.slide import open_slide
    from cellvit_optimus.engine.wsi.tissue import detect_tissue

    def open_job(job: SlideJob) -> None:
        slide = open_slide(job.path, backend=config.backend, mpp=config.mpp,  # type: ignore[arg-type]
                           num_workers=config.scheduler.decode_workers)
        job.slide = slide
        mask = detect_tissue(slide, config.tissue)
        job.grid = tile_grid(slide, config.tiling, mask=mask)
        job.info.update(backend=slide.backend, mpp=list(slide.mpp) if slide.mpp else None,
                        mpp_source=slide.mpp_source, dimensions=list(slide.dimensions))
        if keep_mask:
            job.info["_mask"] = mask
        if read_path is not None:
            read_path.attach(job)

    return open_job


class _FeatureConsumer:
    def __init__(self, writer: FeatureWriter) -> None:
        self.writer = writer

    def on_batch(self, batch: TileBatch) -> None:
        emb = batch.output.embedding if hasattr(batch.output, "embedding") else batch.output
        emb = emb.detach().float().cpu().numpy() if hasattr(emb, "detach") else np.asarray(emb, np.float32)
        self.writer.write(batch.indices, emb, batch.quality)

    def finish(self, job: SlideJob) -> dict[str, Any]:
        return {"features": str(self.writer.commit())}

    def abort(self, job: SlideJob) -> None:
        self.writer.abort()


class FeatureExtractor:
    """scheduler fan-out for feature files: cache check per slide, one streaming writer per slide"""

    def __init__(self, out_dir: str | os.PathLike[str], config: ExtractConfig, backbone_id: str,
                 weights_hash: str, embed_dim: int, normalisation: dict[str, Any], version: str) -> None:
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

    def prepare(self, job: SlideJob) -> dict[str, Any] | None:
        import h5py

        from cellvit_optimus.engine.io import move_aside

        key = self.key_for(job)
        job.info["cache_key"] = key
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

    def consumers(self, job: SlideJob) -> list[Any]:
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
            "cache_key": job.info["cache_key"],
            "slide_fingerprint": job_fingerprint(job),
            "slide_name": job.path.name,
            "package_version": self.version,
            "decoder": job.info.get("decoder", "slide"),
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
        return [_FeatureConsumer(writer)]


def _extractor(runner: BackboneRunner, out_dir: Path, config: ExtractConfig) -> FeatureExtractor:
    from cellvit_optimus.engine import __version__

    norm = {"mean": list(runner.preset.mean), "std": list(runner.preset.std), "dtype": runner.dtype,
            "stain_norm": getattr(runner.stain_norm, "__name__", None) if runner.stain_norm else None}
    return FeatureExtractor(out_dir, config, runner.preset.name, runner.weights_id, runner.embed_dim, norm,
                            __version__)


async def aextract_features(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                            runner: BackboneRunner, config: ExtractConfig | None = None,
                            progress: Callable[[Progress], None] | None = None, *,
                            lock_timeout_s: float | None = None) -> AsyncIterator[SlideDone | Failure]:
    """async stream of per-slide results (as slides finish); safe inside a host asyncio/anyio loop

    The run holds the output folder's lock (:func:`~.io.folder_lock`; a second run waits up to
    ``lock_timeout_s``, default as long as it takes). Slides are written as :func:`~.io.output_names`.
    """
    import anyio

    from cellvit_optimus.engine.io import clean_stale_temporaries, folder_lock, output_names

    config = config or ExtractConfig()
    # the same file twice would write one feature file twice at once: once is enough
    firsts: dict[str, Path] = {}
    for p in paths:
        firsts.setdefault(os.path.abspath(p), Path(p))
    slides = list(firsts.values())
    out = Path(out_dir)
    extractor = _extractor(runner, out, config)
    extractor.names = output_names(slides)
    read_path = TileReadPath(config.decoder, str(runner.device))

    def compute(tiles: np.ndarray):
        return runner(tiles, tokens=False)

    lock = folder_lock(out, lock_timeout_s)
    await anyio.to_thread.run_sync(lock.__enter__)  # waiting for another run never blocks the host's loop
    try:
        await anyio.to_thread.run_sync(clean_stale_temporaries, out / "features")
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
    order = {str(Path(p)): i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order.get(str(Path(r.path)), len(order)))
