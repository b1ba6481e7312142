"""Whole-slide images: opening a slide with one of the reader backends, GPU tile decode, tissue
detection and tiling, and the slide inspection report."""

# the modules are the API (cellvit_optimus.engine.wsi.slide, ...); the package itself exports nothing
__all__: tuple[str, ...] = ()
