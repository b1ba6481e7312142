"""The streaming pipeline: the async tile scheduler, the read path, the backbone runner, nuclei maps
to instances, feature files and feature extraction.

The names below are the wing's public API: other wings import them from here
(``from cellvit_optimus.engine.pipeline import run_pipeline``), never from its modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellvit_optimus.engine.lazy import exports

if TYPE_CHECKING:
    from cellvit_optimus.engine.pipeline.aio import run_sync
    from cellvit_optimus.engine.pipeline.extract import (ExtractConfig, FeatureConsumer, FeatureExtractor,
                                                         aextract_features, build_extractor, extract_features,
                                                         feature_path)
    from cellvit_optimus.engine.pipeline.features import (FeatureFile, cache_key, feature_owner,
                                                          read_features, slide_fingerprint, write_clam_layout,
                                                          write_trident_layout)
    from cellvit_optimus.engine.pipeline.nuclei import (DEFAULT_OVERLAP, MPP_TOLERANCE, PAD_VALUE, NucleiMaps,
                                                        NucleiModel, PostProcessConfig, SegmentResult,
                                                        default_model_path, segment_image, tile_origins,
                                                        tile_to_instances)
    from cellvit_optimus.engine.pipeline.readpath import (DECODERS, Decoder, TileReadPath, job_fingerprint,
                                                          open_job_for)
    from cellvit_optimus.engine.pipeline.runner import BackboneOutput, BackboneRunner
    from cellvit_optimus.engine.pipeline.scheduler import (BatchOutput, ConsumerFactory, ConsumerFacts,
                                                           Progress, SchedulerConfig, SlideConsumer,
                                                           SlideDone, SlideJob, TileBatch, run_pipeline)

_EXPORTS = {
    "run_sync": ".aio",
    "ExtractConfig": ".extract", "FeatureConsumer": ".extract", "FeatureExtractor": ".extract",
    "aextract_features": ".extract", "build_extractor": ".extract", "extract_features": ".extract",
    "feature_path": ".extract",
    "FeatureFile": ".features", "cache_key": ".features", "feature_owner": ".features",
    "read_features": ".features", "slide_fingerprint": ".features", "write_clam_layout": ".features",
    "write_trident_layout": ".features",
    "DEFAULT_OVERLAP": ".nuclei", "MPP_TOLERANCE": ".nuclei", "PAD_VALUE": ".nuclei", "NucleiMaps": ".nuclei",
    "NucleiModel": ".nuclei",
    "PostProcessConfig": ".nuclei", "SegmentResult": ".nuclei", "default_model_path": ".nuclei",
    "segment_image": ".nuclei",
    "tile_origins": ".nuclei", "tile_to_instances": ".nuclei",
    "DECODERS": ".readpath", "Decoder": ".readpath", "TileReadPath": ".readpath",
    "job_fingerprint": ".readpath", "open_job_for": ".readpath",
    "BackboneOutput": ".runner", "BackboneRunner": ".runner",
    "BatchOutput": ".scheduler", "ConsumerFacts": ".scheduler", "ConsumerFactory": ".scheduler",
    "Progress": ".scheduler", "SchedulerConfig": ".scheduler", "SlideConsumer": ".scheduler",
    "SlideDone": ".scheduler", "SlideJob": ".scheduler", "TileBatch": ".scheduler",
    "run_pipeline": ".scheduler",
}

__all__ = ("run_sync", "ExtractConfig", "FeatureConsumer", "FeatureExtractor", "aextract_features",
           "build_extractor", "extract_features", "feature_path", "FeatureFile", "cache_key", "feature_owner",
           "read_features", "slide_fingerprint", "write_clam_layout", "write_trident_layout",
           "DEFAULT_OVERLAP", "MPP_TOLERANCE",
           "PAD_VALUE", "NucleiMaps", "NucleiModel", "PostProcessConfig", "SegmentResult",
           "default_model_path", "segment_image", "tile_origins",
           "tile_to_instances", "DECODERS", "Decoder", "TileReadPath", "job_fingerprint", "open_job_for",
           "BackboneOutput", "BackboneRunner", "BatchOutput", "ConsumerFacts", "ConsumerFactory", "Progress",
           "SchedulerConfig", "SlideConsumer", "SlideDone", "SlideJob", "TileBatch", "run_pipeline")

__getattr__, __dir__ = exports(__name__, _EXPORTS)
