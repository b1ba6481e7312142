"""The command line, end to end on real slides (in-process through click's runner)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from PIL import Image

from cellvit_optimus.engine.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, cli


def test_inspect_bundled_slide_by_default():
    res = CliRunner().invoke(cli, ["inspect"])
    assert res.exit_code == EXIT_OK, res.output
    line = [ln for ln in res.output.splitlines() if ln.startswith("cmu_small_region.svs")][0].split()
    assert line[1:7] == ["cucim", "aperio", "2220x2967", "1", "0.499", line[6]]
    assert int(line[6]) > 40  # tissue tiles at 0.5 um/px


def test_inspect_json_and_thumbnail(tmp_path, slides_dir):
    res = CliRunner().invoke(cli, ["inspect", str(slides_dir / "prostate-small.dcm"), "--json",
                                   "--thumbnails", str(tmp_path)])
    assert res.exit_code == EXIT_OK, res.output
    doc = json.loads(res.output[res.output.index("{"):])
    [s] = doc["slides"]
    assert s["backend"] == "dicom" and s["dimensions"] == [3236, 2638]
    assert s["tissue_tiles"] > 1000 and doc["failures"] == []
    img = Image.open(s["thumbnail_path"])
    assert img.size[0] > 500
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically


def test_inspect_exit_codes(tmp_path, slides_dir):
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    partial = CliRunner().invoke(cli, ["inspect", str(slides_dir / "cmu-1-small-region.svs"), str(bad)])
    assert partial.exit_code == EXIT_PARTIAL
    assert f"FAILED {bad}: not a slide" in partial.output
    failed = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert failed.exit_code == EXIT_FAILED


def test_inspect_mpp_override_and_directory(slides_dir):
    res = CliRunner().invoke(cli, ["inspect", str(slides_dir), "--mpp", "0.25", "--json"])
    doc = json.loads(res.output[res.output.index("{"):])
    names = {s["path"].rsplit("/", 1)[1] for s in doc["slides"]}
    assert {"cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "prostate-small.dcm"} <= names
    reasons = {f["path"].rsplit("/", 1)[1]: f["reason"] for f in doc["failures"]}
    assert reasons == {"kidney-48-5.tif": "no tissue", "small-he-levels.tiff": "no tissue"}
    assert res.exit_code == EXIT_PARTIAL


def test_bad_option_is_a_usage_error():
    res = CliRunner().invoke(cli, ["inspect", "--overlap", "0.95"])
    assert res.exit_code == 2 and "overlap=0.95" in res.output


def test_triage_gzip_writes_compressed_cells(tmp_path, slides_dir):
    import gzip

    from cellvit_optimus.engine.cells import CellTable

    r = CliRunner().invoke(cli, ["triage", str(slides_dir / "cmu-1-small-region.svs"), "--out", str(tmp_path),
                                 "--nuclei-mpp", "4", "--overlap", "32", "--device", "cpu", "--gzip", "-q"])
    assert r.exit_code == EXIT_OK, r.output
    sdir = tmp_path / "cmu-1-small-region"
    assert sorted(p.name for p in sdir.iterdir()) == ["cells.geojson.gz", "overview.png", "regions.geojson",
                                                     "summary.json"]
    doc = json.loads(gzip.decompress((sdir / "cells.geojson.gz").read_bytes()))
    summary = json.loads((sdir / "summary.json").read_text())
    assert len(doc["features"]) == summary["result"]["nuclei"] == sum(summary["result"]["counts"].values())
    assert len(CellTable.from_geojson(sdir / "cells.geojson.gz")) == len(doc["features"])


def test_extract_clam_layout(tmp_path, slides_dir):
    import torch

    r = CliRunner().invoke(cli, ["extract", str(slides_dir / "cmu-1-small-region.svs"), "--out", str(tmp_path),
                                 "--backbone", "tiny", "--target-mpp", "2.0", "--device", "cpu", "--clam-layout",
                                 "-q"])
    assert r.exit_code == EXIT_OK, r.output
    assert (tmp_path / "h5_files").is_symlink() and (tmp_path / "h5_files" / "cmu-1-small-region.h5").is_file()
    x = torch.load(tmp_path / "pt_files" / "cmu-1-small-region.pt")
    assert x.shape[1] == 192 and x.dtype == torch.float32
