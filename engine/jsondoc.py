"""Shared type names for plain documents (after ``timm.layers.typing``): what the engine writes to or
reads from a file or a message as JSON, HDF5 attributes or GeoJSON, where the keys are the file format's,
not the program's state. State that lives in the program has a dataclass of its own (``SlideFacts``,
``SlideResult``, ``BatchOutput``, the configs)."""

from __future__ import annotations

from typing import Any, TypeAlias, TypedDict

__all__ = ("JsonDict", "FileDigest")

#: a JSON object (summary.json and its parts, GeoJSON features, HDF5 attributes, cache-key inputs,
#: slide metadata, score tables): str keys, JSON-compatible values of any shape
JsonDict: TypeAlias = dict[str, Any]


class FileDigest(TypedDict):
    """the size and SHA-256 of a delivered file (``summary.json``'s ``checksums``)"""

    bytes: int
    sha256: str
