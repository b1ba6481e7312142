"""The streaming pipeline: the async tile scheduler, the read path, the backbone runner, nuclei maps
to instances, feature files and feature extraction."""

__all__ = ()
