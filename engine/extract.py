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

import numpy as np

from .errors import ConfigError
from .features import FeatureWriter, cache_key, cached, preprocessing_hash, slide_fingerprint
from .scheduler import Progress, SchedulerConfig, SlideDone, SlideJob, TileBatch, run_pipeline
from .tissue import TilingConfig, TissueConfig, tile_grid

if TYPE_CHECKING:
    from .inspect import Failure
    from .runner import BackboneRunner

__all__ = ("ExtractConfig", "FeatureExtractor", "extract_features", "aextract_features", "feature_path",
           "open_job_for")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """what to tile and how: composed from the subsystem configs"""

    tiling: TilingConfig = field(default_factory=TilingConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    mpp: float | None = None  # level-0 MPP override for slides without (or with wrong) metadata
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.mpp is not None and not 0.05 <= self.mpp <= 50:
            raise ConfigError(f"mpp={self.mpp} outside 0.05..50 um/px")


def feature_path(out_dir: str | os.PathLike[str], slide: str | os.PathLike[str]) -> Path:
    return Path(out_dir) / "features" / f"{Path(slide).stem}.h5"


def open_job_for(config: ExtractConfig, keep_mask: bool = False) -> Callable[[SlideJob], None]:
    """the scheduler's slide opener for ``config``: open, tissue grid, facts for the result
    (``keep_mask`` also keeps the tissue mask in ``job.info["_mask"]``, for overview images)"""
    from .slide import open_slide
    from .tissue import detect_tissue

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

    def key_for(self, job: SlideJob) -> str:
        return cache_key(backbone=self.backbone_id, weights_hash=self.weights_hash,
                         preprocessing=self.preprocessing, slide=slide_fingerprint(job.path),
                         version=self.version)

    def prepare(self, job: SlideJob) -> dict[str, Any] | None:
        key = self.key_for(job)
        job.info["cache_key"] = key
        dest = feature_path(self.out_dir, job.path)
        if cached(dest, key):
            return {"features": str(dest)}
        return None

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
            "slide_fingerprint": slide_fingerprint(job.path),
            "slide_name": job.path.name,
            "package_version": self.version,
        }
        arrays = {"coords": grid.coords.astype(np.int64), "grid_index": grid.grid_index.astype(np.int64),
                  "tissue_fraction": grid.tissue_fraction, "artefact_fraction": grid.artefact_fraction}
        writer = FeatureWriter(feature_path(self.out_dir, job.path), len(grid), self.embed_dim, attrs, arrays)
        return [_FeatureConsumer(writer)]


def _check_unique_stems(paths: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for p in paths:
        other = seen.setdefault(p.stem, p)
        if other != p:
            raise ConfigError(f"two slides share the output name {p.stem!r}: {other} and {p}")


def _extractor(runner: BackboneRunner, out_dir: Path, config: ExtractConfig) -> FeatureExtractor:
    from . import __version__

    norm = {"mean": list(runner.preset.mean), "std": list(runner.preset.std), "dtype": runner.dtype,
            "stain_norm": getattr(runner.stain_norm, "__name__", None) if runner.stain_norm else None}
    return FeatureExtractor(out_dir, config, runner.preset.name, runner.weights_id, runner.embed_dim, norm,
                            __version__)


async def aextract_features(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                            runner: BackboneRunner, config: ExtractConfig | None = None,
                            progress: Callable[[Progress], None] | None = None
                            ) -> AsyncIterator[SlideDone | Failure]:
    """async stream of per-slide results (as slides finish); safe inside a host asyncio/anyio loop"""
    from .io import clean_stale_temporaries

    config = config or ExtractConfig()
    slides = [Path(p) for p in paths]
    _check_unique_stems(slides)
    out = Path(out_dir)
    clean_stale_temporaries(out / "features")
    extractor = _extractor(runner, out, config)

    def compute(tiles: np.ndarray):
        return runner(tiles, tokens=False)

    async with run_pipeline(slides, open_job=open_job_for(config), factory=extractor, compute=compute,
                            config=config.scheduler, progress=progress) as results:
        async for r in results:
            yield r


def extract_features(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                     runner: BackboneRunner, config: ExtractConfig | None = None,
                     progress: Callable[[Progress], None] | None = None) -> list[SlideDone | Failure]:
    """synchronous :func:`aextract_features`; results in input order"""
    import anyio

    async def main() -> list[Any]:
        return [r async for r in aextract_features(paths, out_dir, runner, config, progress)]

    results = anyio.run(main)
    order = {str(Path(p)): i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order.get(str(Path(r.path)), len(order)))
