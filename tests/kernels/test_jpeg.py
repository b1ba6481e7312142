"""The exact entropy-coded syntax check (kernels/jpeg.py) on real slide tiles and damaged copies of them.

No false alarm on any JPEG tile or frame of the real slides (Aperio RGB tiles with shared JPEGTables,
strip pages, 4:2:0 DICOM frames), nor on Pillow streams with restart markers; never weaker than
libjpeg's strict decode; and catches damaged streams that libjpeg decodes without a warning.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from cellvit_optimus.kernels import jpeg_scan_check
from cellvit_optimus.kernels.jpeg import JPEG_PROBLEMS, parse_jpeg

CMU = "cmu-1-small-region.svs"


def _tiff_streams(path):
    """(tables, [tile or strip bytes]) of every JPEG page"""
    import tifffile

    blob = path.read_bytes()
    with tifffile.TiffFile(path) as tf:
        for page in tf.pages:
            if page.compression == 7:
                tables = bytes(page.jpegtables) if page.jpegtables is not None else None
                yield tables, [blob[o:o + c] for o, c in zip(page.dataoffsets, page.databytecounts) if c]


def _strict_ok(data: bytes, tables: bytes | None) -> bool:
    import simplejpeg

    if tables:
        data = tables[:-2] + data[2:]
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
        return False
    return True


def test_every_real_jpeg_tile_and_frame_passes(slides_dir):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.encaps import generate_frames

    counts = {}
    for name in (CMU, "tcga-cr-7395-01a-01-ts1.svs"):
        for tables, streams in _tiff_streams(slides_dir / name):
            found = [jpeg_scan_check(s, tables) for s in streams]
            assert all(f == (0, "") for f in found), (name, [f for f in found if f != (0, "")][:3])
            counts[name] = counts.get(name, 0) + len(streams)
    ds = pydicom.dcmread(slides_dir / "prostate-small.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    scan = parse_jpeg(frames[0])
    assert list(scan.comp_h) == [2, 1, 1] and list(scan.comp_v) == [2, 1, 1]  # 4:2:0: 6 blocks per MCU
    assert all(jpeg_scan_check(f) == (0, "") for f in frames)
    # 130 level-0 tiles + 48 + 27 strips; 48 strips of the TCGA thumbnail (its level 0 is JPEG 2000)
    assert counts == {CMU: 205, "tcga-cr-7395-01a-01-ts1.svs": 48} and len(frames) == 42


@pytest.mark.parametrize("options", [{"restart_marker_blocks": 1}, {"restart_marker_blocks": 7, "subsampling": 0},
                                     {"restart_marker_rows": 1}, {"quality": 40}])
def test_pillow_streams_with_restart_markers_pass_and_a_missing_marker_is_found(slides_dir, options):
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(slides_dir / CMU) as tf:
        patch = tf.pages[0].asarray()[1000:1240, 600:840]
    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, "JPEG", **options)
    data = buf.getvalue()
    assert jpeg_scan_check(data) == (0, "")
    rst = data.find(b"\xff\xd3")  # the fourth restart marker, where the stream has one
    if parse_jpeg(data).restart_interval and rst > 0:
        broken = data[:rst] + b"\xff\xd5" + data[rst + 2:]  # out of order
        assert jpeg_scan_check(broken)[1] == JPEG_PROBLEMS[6]


def test_progressive_streams_are_not_covered_rather_than_flagged():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(buf, "JPEG", progressive=True)
    assert jpeg_scan_check(buf.getvalue()) is None


def test_flips_libjpeg_accepts_are_caught_and_the_walk_is_never_weaker(slides_dir):
    [(tables, tiles), *_] = list(_tiff_streams(slides_dir / CMU))
    rng = np.random.default_rng(7)
    libjpeg_caught = walk_caught = missed_by_walk = 0
    kinds: set[str] = set()
    for _ in range(300):
        i = int(rng.integers(len(tiles)))
        t = bytearray(tiles[i])
        o = int(rng.integers(min(700, len(t) // 2), len(t) - 2))  # past the tile's own headers
        t[o] ^= int(rng.integers(1, 256))
        found = jpeg_scan_check(bytes(t), tables)
        if not _strict_ok(bytes(t), tables):
            libjpeg_caught += 1
            missed_by_walk += found == (0, "")
        elif found != (0, ""):
            walk_caught += 1
            kinds.add(found[1])
    print(f"\n300 flips: libjpeg strict caught {libjpeg_caught}, the walk {walk_caught} more ({sorted(kinds)})")
    # the walk sees every structural fault libjpeg warns about (not its marker-only warnings)
    assert missed_by_walk == 0
    assert libjpeg_caught > 150 and walk_caught >= 20


def test_padding_bits_and_trailing_data_are_checked(slides_dir):
    [(tables, tiles), *_] = list(_tiff_streams(slides_dir / CMU))
    # a tile whose last entropy-coded byte has padding bits: clear them one by one
    seen = 0
    for tile in tiles:
        last = tile[-3]
        if last == 0xFF or last & 1 == 0:
            continue
        broken = tile[:-3] + bytes([last & 0xFE]) + tile[-2:]
        found = jpeg_scan_check(broken, tables)
        if found != (0, ""):  # the last bit was padding (else the flip changed a code or magnitude)
            assert found[1] in (JPEG_PROBLEMS[7], JPEG_PROBLEMS[1], JPEG_PROBLEMS[3], JPEG_PROBLEMS[5])
            seen += found[1] == JPEG_PROBLEMS[7]
    assert seen >= 10
    extra = tiles[0][:-2] + b"\x12\x34" + tiles[0][-2:]
    assert jpeg_scan_check(extra, tables)[1] == JPEG_PROBLEMS[8]
    assert _strict_ok(tiles[0], tables)


def test_broken_headers_raise():
    with pytest.raises(ValueError, match="marker"):
        jpeg_scan_check(b"\xff\xd8\xff\xc4\x00\x40")
    with pytest.raises(ValueError, match="no scan"):
        jpeg_scan_check(b"\xff\xd8\xff\xd9")
