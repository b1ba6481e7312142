"""Whole-slide images: opening a slide with one of the reader backends, GPU tile decode, tissue
detection and tiling, and the slide inspection report."""
