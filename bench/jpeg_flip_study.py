"""What the corrupt-tile check can and cannot see: single-byte flips in the bundled slide's JPEG tiles.

``python bench/jpeg_flip_study.py [--flips 600] [--seed 1]``

Each flip XORs one random byte (past the tile's own headers) of one random level-0 tile of
``engine/data/cmu_small_region.svs`` with a random non-zero value. Counted: caught by libjpeg's strict
decode (simplejpeg, ``strict=True``), caught by the exact code walk only
(:func:`cellvit_optimus.kernels.jpeg_scan_check`), and the rest, valid JPEG streams, split by how many
pixels decode differently from the clean tile (at most 256: a few 8 x 8 blocks; more: a colour shift
over the rest of the tile). README "Corrupt tiles" quotes the default run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "engine" / "data" / "cmu_small_region.svs"


def main() -> None:
    import simplejpeg
    import tifffile
    from cellvit_optimus.kernels import jpeg_scan_check

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flips", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    with tifffile.TiffFile(SRC) as tf:
        page = tf.pages[0]
        head = bytes(page.jpegtables)[:-2]
        blob = SRC.read_bytes()
        tiles = [blob[o:o + c] for o, c in zip(page.dataoffsets, page.databytecounts)]
    rng = np.random.default_rng(a.seed)
    counts = {"libjpeg_strict": 0, "walk_only": 0, "valid_at_most_256_px": 0, "valid_more": 0, "valid_same": 0}
    for _ in range(a.flips):
        i = int(rng.integers(len(tiles)))
        t = bytearray(tiles[i])
        o = int(rng.integers(min(700, len(t) // 2), len(t) - 2))
        t[o] ^= int(rng.integers(1, 256))
        try:
            got = simplejpeg.decode_jpeg(head + bytes(t[2:]), colorspace="RGB", strict=True)
        except ValueError:
            counts["libjpeg_strict"] += 1
            continue
        if jpeg_scan_check(bytes(t), bytes(page.jpegtables)) != (0, ""):
            counts["walk_only"] += 1
            continue
        ref = simplejpeg.decode_jpeg(head + tiles[i][2:], colorspace="RGB", strict=True)
        changed = int((got != ref).any(-1).sum())
        counts["valid_same" if changed == 0 else "valid_at_most_256_px" if changed <= 256 else "valid_more"] += 1
    print(json.dumps({"flips": a.flips, "seed": a.seed, **counts}))


if __name__ == "__main__":
    main()
