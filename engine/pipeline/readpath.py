"""The tile read path: how a slide job's tiles become pixels, and the slide opener that picks it.

Where it sits: between the scheduler's slide source and its reader threads. :func:`open_job_for` is the
scheduler's ``open_job`` (open the slide, detect tissue, lay the tile grid, pick the read path);
:class:`TileReadPath` ``read`` is its ``read_tiles``. Feature extraction and triage both use them, so
every run reads tiles the same way; :func:`job_fingerprint` is the per-job slide fingerprint both key
their caches and finished-slide records on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import numpy as np

from cellvit_optimus.engine.errors import BackendUnavailableError, ConfigError, UnsupportedFormatError
from cellvit_optimus.engine.pipeline.features import slide_fingerprint
from cellvit_optimus.engine.pipeline.scheduler import SchedulerConfig, SlideJob
from cellvit_optimus.engine.wsi import TilingConfig, TissueConfig, tile_grid

if TYPE_CHECKING:
    from cellvit_optimus.engine.wsi import BackendName

__all__ = ("DECODERS", "Decoder", "SlideOpening", "TileReadPath", "job_fingerprint", "open_job_for")

log = logging.getLogger(__name__)

#: tile read paths: "auto" (the GPU path when the backbone runs on CUDA, a GPU decoder is usable, the
#: slide's tiles are JPEG and the GPU path measures faster on the first such slide; else the slide
#: reader), "slide" (the slide reader on the host: cuCIM, tiffslide, ...), "dali" / "cucim" / "nvjpeg"
#: (that GPU decoder, for every slide it can read; "nvjpeg" is torchvision's, in every CUDA torch
#: image), "reference" (the GPU path's logic with the host JPEG decoder: raw tile streams, assembly and
#: resampling in torch, on the backbone's device; for tests)
Decoder = Literal["auto", "slide", "dali", "cucim", "nvjpeg", "reference"]
DECODERS: tuple[Decoder, ...] = get_args(Decoder)


class SlideOpening(Protocol):
    """what :func:`open_job_for` reads from a run's config (:class:`~.extract.ExtractConfig` has it all)"""

    @property
    def tiling(self) -> TilingConfig: ...
    @property
    def tissue(self) -> TissueConfig: ...
    @property
    def scheduler(self) -> SchedulerConfig: ...
    @property
    def mpp(self) -> float | None: ...
    @property
    def backend(self) -> BackendName: ...


class TileReadPath:
    """turns a slide job's tile coordinates into pixels for the scheduler's reader threads: the slide
    reader on the host, or raw JPEG tiles decoded on the GPU (:mod:`.gpu_decode`), chosen per slide.

    ``attach`` (called by the slide opener) picks the path and records it in ``job.facts.decoder``
    with the reason; ``read`` is the scheduler's ``read_tiles``. On the GPU path tiles stay on the device
    as a uint8 torch tensor, which the runner takes without a host round trip; tile quality is computed
    there too. Slides the GPU path cannot read (JPEG 2000, DICOM, untiled) use the slide reader.
    """

    def __init__(self, decoder: Decoder = "auto", device: str = "cpu") -> None:
        if decoder not in DECODERS:
            raise ConfigError(f"decoder={decoder!r} is not one of {', '.join(DECODERS)}")
        self.decoder = decoder
        self.device = str(device)
        self._auto: tuple[bool, str] | None = None  # "auto": measured once per run, on the first JPEG slide
        self._lock = threading.Lock()

    def attach(self, job: SlideJob) -> None:
        from cellvit_optimus.engine.wsi import GpuTileReader, choose_decoder

        slide, grid = job.slide, job.grid
        assert slide is not None and grid is not None
        on_cuda = self.device.startswith("cuda")
        if self.decoder == "slide" or (self.decoder == "auto" and not on_cuda) or not len(grid):
            why = "asked for" if self.decoder == "slide" else "no tiles" if not len(grid) else "backbone not on CUDA"
            job.note(decoder="slide", decoder_reason=why)
            return
        name = "cpu" if self.decoder == "reference" else self.decoder  # GpuTileReader's decoder names
        try:
            reader = GpuTileReader(slide, decoder=name, device=self.device)  # type: ignore[arg-type]
        except UnsupportedFormatError as exc:
            job.note(decoder="slide", decoder_reason=f"GPU read path cannot read this slide: {exc}")
            return
        except BackendUnavailableError as exc:
            if self.decoder != "auto":
                raise  # asked for by name: the slide fails with the message naming the package
            job.note(decoder="slide", decoder_reason=f"GPU decode unavailable: {exc}")
            return
        except Exception as exc:  # noqa: BLE001  a decoder that fails to start (DALI pipeline, cuCIM)
            if self.decoder != "auto":
                raise
            job.note(decoder="slide", decoder_reason=f"GPU decoder failed to start: {type(exc).__name__}: "
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
                job.note(decoder="slide", decoder_reason=why)
                return
        else:
            why = "asked for"
        job.reader = reader
        job.note(decoder=reader.decoder if self.decoder != "reference" else "reference", decoder_reason=why)

    def read(self, job: SlideJob, idx: np.ndarray) -> tuple[Any, dict[str, np.ndarray]]:
        """the scheduler's ``read_tiles``: ``(tiles, quality)`` of the grid tiles ``idx``

        On the GPU path the decode, assembly, resampling and tile quality run on the reader thread's own
        CUDA stream, which is waited for before returning (:class:`~.gpu_decode.reader_stream`): the
        reader waits for its own work, never behind the backbone's graph replays, and the tiles it hands
        on are complete."""
        from cellvit_optimus.engine.wsi import reader_stream, tile_quality

        grid = job.grid
        assert job.slide is not None and grid is not None
        locs = [tuple(c) for c in grid.coords[idx].tolist()]
        if job.reader is None:
            tiles = job.slide.read_tiles(locs, grid.tile_size, grid.target_mpp)
            return tiles, tile_quality(tiles)
        # GPU decoders return damaged pixels silently too: the slide reader's strict check first
        job.slide.check_tiles(locs, grid.tile_size, grid.target_mpp)
        with reader_stream(getattr(job.reader, "device", "cpu")):
            tiles = job.reader.read_tiles(locs, grid.tile_size, grid.target_mpp)
            quality = tile_quality(tiles)
        fallback = getattr(job.reader, "fallback_reason", None)
        if fallback is not None:  # the GPU decoder failed on some batches: the host reader read them
            job.note(decoder_fallback=fallback, decoder_fallbacks=job.reader.fallbacks)
        return tiles, quality


def job_fingerprint(job: SlideJob) -> str:
    """the slide's fingerprint with its mtime (cache and finished-slide keys), computed once per job"""
    fp = job.facts.fingerprint
    if fp is None:
        fp = job.note(fingerprint=slide_fingerprint(job.path, mtime=True)).fingerprint
        assert fp is not None
    return fp


def open_job_for(config: SlideOpening, keep_mask: bool = False,
                 read_path: TileReadPath | None = None) -> Callable[[SlideJob], None]:
    """the scheduler's slide opener for ``config``: open, tissue grid, facts for the result
    (``keep_mask`` also keeps the tissue mask in ``job.mask``, for overview images;
    ``read_path`` picks the slide's tile read path, whose ``read`` the scheduler then uses)"""
    from cellvit_optimus.engine.wsi import detect_tissue, open_slide

    def open_job(job: SlideJob) -> None:
        slide = open_slide(job.path, backend=config.backend, mpp=config.mpp,
                           num_workers=config.scheduler.decode_workers)
        job.slide = slide
        mask = detect_tissue(slide, config.tissue)
        job.grid = tile_grid(slide, config.tiling, mask=mask)
        job.note(backend=slide.backend, mpp=tuple(slide.mpp) if slide.mpp else None,
                 mpp_source=slide.mpp_source, dimensions=tuple(slide.dimensions),
                 level=slide.best_level_for(job.grid.target_mpp) if slide.mpp else None)
        if keep_mask:
            job.mask = mask
        if read_path is not None:
            read_path.attach(job)

    return open_job
