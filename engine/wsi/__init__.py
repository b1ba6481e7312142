"""Whole-slide images: opening a slide with one of the reader backends, GPU tile decode, tissue
detection and tiling, and the slide inspection report.

The names below are the wing's public API: other wings import them from here
(``from cellvit_optimus.engine.wsi import open_slide``), never from its modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellvit_optimus.engine.lazy import exports

if TYPE_CHECKING:
    from cellvit_optimus.engine.wsi.backend import BackendName
    from cellvit_optimus.engine.wsi.cucim import NATIVE_NOISE, quiet_native_output
    from cellvit_optimus.engine.wsi.facts import SlideFacts
    from cellvit_optimus.engine.wsi.gpu_decode import (GpuTileReader, choose_decoder, gpu_decoders_available,
                                                       reader_stream)
    from cellvit_optimus.engine.wsi.inspect import (Failure, SlideReport, failure_from, inspect_many,
                                                    inspect_slide)
    from cellvit_optimus.engine.wsi.jpegcheck import strict_decode
    from cellvit_optimus.engine.wsi.paths import collect_inputs, iter_slide_paths
    from cellvit_optimus.engine.wsi.slide import Slide, available_backends, open_slide, resize_batch
    from cellvit_optimus.engine.wsi.tissue import (TileGrid, TilingConfig, TissueConfig, TissueMask,
                                                   detect_tissue, draw_overlay, tile_grid, tile_quality)

_EXPORTS = {
    "BackendName": ".backend",
    "NATIVE_NOISE": ".cucim", "quiet_native_output": ".cucim",
    "SlideFacts": ".facts",
    "GpuTileReader": ".gpu_decode", "choose_decoder": ".gpu_decode", "gpu_decoders_available": ".gpu_decode",
    "reader_stream": ".gpu_decode",
    "Failure": ".inspect", "SlideReport": ".inspect", "failure_from": ".inspect", "inspect_many": ".inspect",
    "inspect_slide": ".inspect",
    "strict_decode": ".jpegcheck",
    "collect_inputs": ".paths", "iter_slide_paths": ".paths",
    "Slide": ".slide", "available_backends": ".slide", "open_slide": ".slide", "resize_batch": ".slide",
    "TileGrid": ".tissue", "TilingConfig": ".tissue", "TissueConfig": ".tissue", "TissueMask": ".tissue",
    "detect_tissue": ".tissue", "draw_overlay": ".tissue", "tile_grid": ".tissue", "tile_quality": ".tissue",
}

__all__ = ("BackendName", "NATIVE_NOISE", "quiet_native_output", "SlideFacts", "GpuTileReader",
           "choose_decoder", "gpu_decoders_available", "reader_stream", "Failure", "SlideReport", "failure_from", "inspect_many", "inspect_slide",
           "strict_decode", "collect_inputs", "iter_slide_paths", "Slide", "available_backends", "open_slide",
           "resize_batch", "TileGrid", "TilingConfig", "TissueConfig", "TissueMask", "detect_tissue",
           "draw_overlay", "tile_grid", "tile_quality")

__getattr__, __dir__ = exports(__name__, _EXPORTS)
