"""The facts a slide carries through a run, from opening it to finalising it: one frozen record.

Where it sits: the slide opener (``pipeline.readpath.open_job_for``) fills in what reading found, the
read path adds the tile decoder, the feature cache adds its key; triage reads the level-0 MPP from it
when it scales nuclei and tissue areas. Each stage hands on a new record (:func:`dataclasses.replace`),
so what a slide carries is written down here, not discovered by grepping dictionary keys.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("SlideFacts",)


@dataclass(frozen=True)
class SlideFacts:
    """what one slide carries from reading to finalising

    Attributes:
        backend: the reader that opened it (``cucim``, ``tiffslide``, ``dicom``, ``openslide``).
        mpp: level-0 microns per pixel as ``(x, y)``, or None when neither the file nor the config has it.
        mpp_source: where ``mpp`` came from (the slide's metadata key, or the config override).
        dimensions: level-0 ``(width, height)`` in pixels.
        level: the pyramid level its tiles are read from (the closest one at least as fine as the tiles).
        fingerprint: the slide's content fingerprint with its modification time (``slide_fingerprint``);
            an input of the feature cache key and of the finished-slide check.
        cache_key: the feature cache key of this slide in this run (backbone, weights, preprocessing,
            version, fingerprint); None until the feature cache has been asked.
        decoder: the tile read path (``slide`` for the slide reader, else the GPU decoder's name).
        decoder_reason: why that read path was chosen.
        decoder_fallback: why the GPU decoder handed some batches to the slide reader (None: it did not).
        decoder_fallbacks: how many batches it handed over.
    """

    backend: str | None = None
    mpp: tuple[float, float] | None = None
    mpp_source: str | None = None
    dimensions: tuple[int, int] | None = None
    level: int | None = None
    fingerprint: str | None = None
    cache_key: str | None = None
    decoder: str | None = None
    decoder_reason: str | None = None
    decoder_fallback: str | None = None
    decoder_fallbacks: int | None = None

    def as_info(self) -> dict[str, object]:
        """the facts as the plain mapping ``SlideDone.info`` has always shown (only those known, MPP and
        dimensions as lists, the fingerprint as ``slide_fingerprint``)"""
        out: dict[str, object] = {}
        if self.backend is not None:
            out.update(backend=self.backend, mpp=list(self.mpp) if self.mpp else None,
                       mpp_source=self.mpp_source,
                       dimensions=list(self.dimensions) if self.dimensions is not None else None)
        if self.level is not None:
            out["level"] = self.level
        if self.fingerprint is not None:
            out["slide_fingerprint"] = self.fingerprint
        if self.cache_key is not None:
            out["cache_key"] = self.cache_key
        if self.decoder is not None:
            out.update(decoder=self.decoder, decoder_reason=self.decoder_reason)
        if self.decoder_fallback is not None:
            out.update(decoder_fallback=self.decoder_fallback, decoder_fallbacks=self.decoder_fallbacks)
        return out
