"""One home for the engine's defaults: every size, resolution and choice a run falls back to when the
caller names none. The config dataclasses (``SchedulerConfig``, ``TilingConfig``, ``TriageConfig``) take
their field defaults from here, and the CLI takes its flag defaults from those fields, so a default is
written once (``tests/engine/test_settings.py`` checks that the two agree and that changing a value
here changes both).

Two batch sizes, for two different things:

- the **read chunk** (:data:`TRIAGE_READ_CHUNK`, :data:`EXTRACT_READ_CHUNK`): tiles a reader thread
  reads, checks and hands on as one unit (``SchedulerConfig.batch_tiles``; host memory and queue
  granularity);
- the **forward micro-batch** (:data:`FORWARD_BATCH`): tiles per backbone forward pass, by device
  (compute memory; a read chunk is split into micro-batches of this size).
"""

from __future__ import annotations

__all__ = ("EXTRACT_READ_CHUNK", "TRIAGE_READ_CHUNK", "FORWARD_BATCH", "BACKBONE_CPU_BATCH", "READER_THREADS",
           "REFERENCE_MPP", "MIN_TISSUE_FRACTION", "TRIAGE_OVERLAP_PX", "DEFAULT_DEVICE", "forward_batch",
           "resolve_device")

#: tiles per read chunk when extracting features (the backbone alone, so larger chunks)
EXTRACT_READ_CHUNK = 32
#: tiles per read chunk when triaging (``--read-chunk``; each chunk carries nuclei maps downstream)
TRIAGE_READ_CHUNK = 16
#: tiles per backbone forward pass of the nuclei model, by device kind (``--batch-size``). On the CPU
#: small batches are both faster and far lighter: the UNETR decoder's full-resolution activations scale
#: with the batch (bundled model, 2 threads, load 3: 170 ms/tile and 630 MiB peak RSS at 4 against
#: 264-286 ms/tile and 960-995 MiB at 16; bench/test_bench_e2e.py -k micro_batch compares them)
FORWARD_BATCH: dict[str, int] = {"cpu": 4, "cuda": 16}
#: tiles per forward of a bare backbone on the CPU (feature extraction; on CUDA the batch is fitted to
#: the memory budget, ``--vram-gb``)
BACKBONE_CPU_BATCH = 32
#: concurrent slide reads (``--workers``)
READER_THREADS = 2
#: the resolution (um/px, 40x) that HoVer-Net's post-processing sizes and its 12 px detection radius
#: are given at; they are scaled by ``REFERENCE_MPP / mpp`` to the resolution a model runs at
REFERENCE_MPP = 0.25
#: minimum tissue fraction of a kept tile (``--min-tissue``)
MIN_TISSUE_FRACTION = 0.25
#: pixels two neighbouring triage tiles share at the nuclei resolution (nuclei up to 32 px radius stay whole)
TRIAGE_OVERLAP_PX = 64
#: the compute device a run asks for (``--device``): ``auto`` is CUDA when torch sees a GPU, else the CPU
DEFAULT_DEVICE = "auto"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; any other name unchanged (the one place
    ``auto`` is resolved: the CLI, the :class:`~.triage.Engine` and each Ray actor call this)"""
    if device != "auto":
        return device
    import torch  # here, not at the top: importing the settings must not load torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def forward_batch(device: str) -> int:
    """the default forward micro-batch for ``device`` (a resolved name: ``cpu``, ``cuda``, ``cuda:1``)"""
    return FORWARD_BATCH["cuda" if str(device).startswith("cuda") else "cpu"]
