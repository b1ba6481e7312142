"""Data shipped inside the package: the bundled real slide and the default model weights."""
