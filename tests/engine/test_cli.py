"""The command line, end to end on real slides (in-process through click's runner)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from cellvit_optimus.engine.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, cli, collect_inputs


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
    assert res.exit_code == 2 and "'--overlap'" in res.output and "0.95 of a tile" in res.output


TRAIN = ("--dataset", "consep", "--out", "x/m.safetensors")
BAD_ARGUMENTS = [
    (["triage", "--mpp", "-1"], "'--mpp'", "-1.0 is not in the range"),
    (["triage", "--mpp", "0"], "'--mpp'", "0.0 is not in the range"),
    (["triage", "--min-tissue", "2"], "'--min-tissue'", "2.0 is not in the range"),
    (["triage", "--nuclei-mpp", "-1"], "'--nuclei-mpp'", "-1.0 is not in the range"),
    (["triage", "--overlap", "-5"], "'--overlap'", "-5 is not in the range"),
    (["triage", "--batch-size", "0"], "'--batch-size'", "0 is not in the range"),
    (["triage", "--shadow-slides", "-1"], "'--shadow-slides'", "-1 is not in the range"),
    (["triage", "--outputs", "cells"], "'--outputs'", "must include 'summary'"),
    (["triage", "--outputs", "summary,pdf"], "'--outputs'", "pdf unknown"),
    (["triage", "--device", "tpu"], "'--device'", "'tpu' is not a device"),
    (["triage", "--thresholds", "no-such.json"], "'--thresholds'", "does not exist"),
    (["triage", "--nuclei-weights", "no-such.safetensors"], "'--nuclei-weights'", "does not exist"),
    (["triage", "--backbone-weights", "no-such.safetensors"], "'--backbone-weights'", "no such file"),
    (["triage", "--site-id", " "], "'--site-id'", "must not be empty"),
    (["triage", "no-such-slide.svs"], "SLIDES", "no-such-slide.svs: no such file or folder"),
    (["inspect", "--mpp", "-1"], "'--mpp'", "-1.0 is not in the range"),
    (["inspect", "--target-mpp", "0"], "'--target-mpp'", "0.0 is not in the range"),
    (["inspect", "--overlap", "1.5"], "'--overlap'", "not a whole number of pixels"),
    (["inspect", "no-such-slide.svs"], "SLIDES", "no-such-slide.svs: no such file or folder"),
    (["extract", "--out", "x", "--mpp", "-1"], "'--mpp'", "-1.0 is not in the range"),
    (["extract", "--out", "x", "--min-tissue", "2"], "'--min-tissue'", "2.0 is not in the range"),
    (["extract", "--out", "x", "--vram-gb", "0"], "'--vram-gb'", "0.0 is not in the range"),
    (["extract", "--out", "x", "--weights", "no-such.pt"], "'--weights'", "no such file"),
    (["segment", "a.png", "--out", "x", "--mpp", "-1"], "'--mpp'", "-1.0 is not in the range"),
    (["segment", "a.png", "--out", "x", "--mpp", "0.25", "--device", "tpu"], "'--device'", "'tpu' is not a device"),
    (["segment", "a.png", "--out", "x", "--mpp", "0.25", "--overlap", "-1"], "'--overlap'", "-1 is not in the range"),
    (["segment", "a.png", "--out", "x", "--mpp", "0.25"], "IMAGES", "a.png: no such file"),
    (["train", "nuclei", *TRAIN, "--mpp", "0"], "'--mpp'", "0.0 is not in the range"),
    (["train", "nuclei", *TRAIN, "--source-mpp", "-1"], "'--source-mpp'", "-1.0 is not in the range"),
    (["train", "nuclei", *TRAIN, "--batch-size", "0"], "'--batch-size'", "0 is not in the range"),
    (["train", "nuclei", *TRAIN, "--crop", "100"], "'--crop'", "100 is not a multiple of 14"),
    (["train", "nuclei", *TRAIN, "--decoder-channels", "16,32"], "'--decoder-channels'", "expected 4 positive"),
    (["train", "nuclei", *TRAIN, "--end-to-end", "--steps", "0"], "'--steps'", "0 is not in the range"),
    (["train", "nuclei", *TRAIN, "--end-to-end", "--checkpoint-every", "-5"], "'--checkpoint-every'",
     "-5 is not in the range"),
    (["train", "nuclei", *TRAIN, "--end-to-end", "--eval-every", "0"], "'--eval-every'", "0 is not in the range"),
    (["train", "nuclei", *TRAIN, "--end-to-end", "--negatives", "no-such.svs"], "'--negatives'", "does not exist"),
    (["train", "mil", ".", ".", "--out", "m.safetensors", "--epochs", "0"], "'--epochs'", "0 is not in the range"),
]


@pytest.mark.parametrize("args,flag,why", BAD_ARGUMENTS, ids=[" ".join(a[0]) for a in BAD_ARGUMENTS])
def test_bad_argument_names_the_flag_and_exits_2(args, flag, why, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative names above must not exist
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    error = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and flag in error[0] and why in error[0], res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()  # nothing ran


@pytest.mark.parametrize("args", [["triage", "--out", "f/sub"], ["extract", "--out", "f"],
                                  ["segment", "a.png", "--mpp", "0.25", "--out", "f"],
                                  ["train", "nuclei", "--dataset", "consep", "--out", "f/m.safetensors"],
                                  ["inspect", "--thumbnails", "f/t"]], ids=lambda a: " ".join(a[:2]))
def test_output_under_a_file_is_a_usage_error(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("a file, not a folder\n")
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    [error] = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert "is a file" in error and "'--out'" in error or "'--thumbnails'" in error, error


def test_folder_inputs_list_what_is_skipped_and_why(tmp_path, slides_dir):
    (tmp_path / "sub").mkdir()
    shutil.copy(slides_dir / "cmu-1-small-region.svs", tmp_path / "sub" / "deep.svs")
    shutil.copy(slides_dir / "cmu-1-small-region.svs", tmp_path / "top.svs")
    (tmp_path / "notes.txt").write_text("not a slide\n")
    (tmp_path / "scan.mrxs").write_bytes(b"")
    (tmp_path / "scan").mkdir()  # a MIRAX slide's data folder: part of scan.mrxs, neither run nor listed
    slides, skipped, missing = collect_inputs([tmp_path, tmp_path / "gone.svs"])
    assert [p.name for p in slides] == ["scan.mrxs", "top.svs", "gone.svs"]
    assert missing == [str(tmp_path / "gone.svs")]
    assert dict(skipped) == {str(tmp_path / "notes.txt"): "not a slide file type (.txt)",
                             str(tmp_path / "sub"): "folder (add --recursive to search it)"}
    slides, skipped, _ = collect_inputs([tmp_path], recursive=True)
    assert [p.name for p in slides] == ["scan.mrxs", "deep.svs", "top.svs"]
    assert dict(skipped) == {str(tmp_path / "notes.txt"): "not a slide file type (.txt)"}


def test_triage_batch_lists_missing_and_skipped_inputs_in_the_worklist(tmp_path, slides_dir):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(slides_dir / "cmu-1-small-region.svs", src / "sub" / "deep.svs")
    (src / "notes.txt").write_text("not a slide\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["triage", str(src), str(tmp_path / "gone.svs"), "--recursive", "--out", str(out),
                                   "--nuclei-mpp", "4", "--overlap", "32", "--shadow-slides", "0", "-q"])
    assert res.exit_code == EXIT_PARTIAL, res.output
    with open(out / "worklist.csv") as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert rows["deep"]["status"] == "done" and rows["deep"]["rank"] == "1"
    assert rows["gone"]["status"] == "failed" and rows["gone"]["reason"].startswith("not found")
    assert rows["notes.txt"]["status"] == "skipped"
    assert rows["notes.txt"]["reason"] == "not a slide file type (.txt)"
    # each failure printed once (not as a log warning and again as FAILED)
    assert res.output.count("gone.svs") == 1, res.output


def test_cli_decoder_choices_and_slide_suffixes_are_the_engines():
    import inspect

    from cellvit_optimus.engine import cli as cli_module
    from cellvit_optimus.engine.cli_params import SLIDE_SUFFIXES
    from cellvit_optimus.engine.pipeline.extract import DECODERS
    from cellvit_optimus.engine.wsi.paths import iter_slide_paths

    assert cli_module._DECODERS == DECODERS
    assert SLIDE_SUFFIXES == inspect.signature(iter_slide_paths).parameters["suffixes"].default
    from cellvit_optimus.engine.cli_params import HEAD_DTYPES
    from cellvit_optimus.engine.pipeline.nuclei import HEAD_DTYPES as MODEL_HEAD_DTYPES

    assert HEAD_DTYPES == MODEL_HEAD_DTYPES


def test_triage_gzip_writes_compressed_cells(tmp_path, slides_dir):
    import gzip

    from cellvit_optimus.engine.triage.cells import CellTable

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


# -- refusals that once came only after the model loaded (9-27 s): each now fails in click ------------------
# Run as a user runs them: a fresh interpreter through the console entry point. The issue asks for under 2 s
# (0.1-0.7 s wall measured at load 4 beside a training run). The bound here is 2 s of the refusing process's
# CPU time, which a loaded machine does not inflate as it does wall time (10.8 s wall was seen at load 8,
# niced, with other test suites running); the stronger check is that torch was never imported, i.e. no
# model was built before the refusal.
_PROBE = ("import atexit, sys\n"
          "atexit.register(lambda: print('TORCH-IMPORTED', 'torch' in sys.modules, file=sys.stderr))\n"
          "from cellvit_optimus.engine.cli import main\nmain(sys.argv[1:])\n")


def _refusal(tmp_path, bad: str, flag_args: list[str]) -> None:
    import resource
    import subprocess
    import sys

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    t = cpu()
    res = subprocess.run([sys.executable, "-c", _PROBE, "triage", *flag_args, "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    cpu_s = cpu() - t
    assert res.returncode == 2, res.stderr[-2000:]
    [error] = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    flag = flag_args[0] if flag_args[0].startswith("--") else "SLIDES"
    assert flag in error and bad in error, error
    assert "TORCH-IMPORTED False" in res.stderr, res.stderr[-2000:]
    assert cpu_s < 2.0, f"{cpu_s:.2f} s of CPU to refuse {flag_args}"
    assert not (tmp_path / "out").exists()


def test_bad_thresholds_file_is_refused_before_the_model(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"np_entropy_max": 0.2,\n')  # cut short
    _refusal(tmp_path, str(bad), ["--thresholds", str(bad)])
    bad.write_text('{"kind": "tag_thresholds", "version": 1, "no_such_field": 1}')
    _refusal(tmp_path, str(bad), ["--thresholds", str(bad)])


def test_garbage_nuclei_weights_are_refused_before_the_model(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(bytes(range(256)) * 20)
    _refusal(tmp_path, str(bad), ["--nuclei-weights", str(bad)])


def test_unavailable_device_is_refused_before_the_model(tmp_path):
    from cellvit_optimus.engine.cli_params import cuda_device_count

    count = cuda_device_count()
    if isinstance(count, int) and count > 0:
        _refusal(tmp_path, f"cuda:{count}", ["--device", f"cuda:{count}"])  # one past the last device
    else:
        _refusal(tmp_path, "cuda", ["--device", "cuda"])


def test_text_file_given_as_a_slide_is_refused_before_the_model(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a slide\n")
    _refusal(tmp_path, str(notes), [str(notes)])


def test_checkpoint_header_check_passes_the_bundled_model_and_knows_the_formats():
    from cellvit_optimus.engine.cli_params import MIL_FORMAT, NUCLEI_FORMAT, read_safetensors_metadata
    from cellvit_optimus.engine.pipeline.nuclei import default_model_path
    from cellvit_optimus.heads import checkpoint

    assert (NUCLEI_FORMAT, MIL_FORMAT) == (checkpoint.NUCLEI_FORMAT, checkpoint.MIL_FORMAT)
    assert read_safetensors_metadata(default_model_path())["format"] == NUCLEI_FORMAT


def test_ctrl_c_exits_130_with_the_worklist_written(tmp_path, slides_dir):
    """SIGINT mid-slide: exit 130 (not 1, the partial-batch code, nor click's "Aborted!"), and the worklist
    lists the unfinished slide as interrupted"""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cli_path = Path(sys.executable).parent / "cellvit-optimus"
    # the bundled slide at its model's resolution: 123 tiles, about a minute on 2 cores, so never done in time
    args = [str(cli_path), "triage", str(slides_dir / "cmu-1-small-region.svs"), "--out", str(out),
            "--shadow-slides", "0"]
    # the child starts with Ctrl-C's default action, as in a terminal: a test run launched in the background
    # (`cmd &` in a script) ignores SIGINT, the child would inherit that and Python keeps an ignored SIGINT
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not (out / ".optimus.lock").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)  # the run owns the folder: the model is loaded and the batch starts
        assert proc.poll() is None, proc.communicate()
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "Aborted!" not in stderr, stderr[-2000:]
    assert "interrupted:" in stderr and "worklist.csv" in stderr, stderr[-2000:]
    with open(out / "worklist.csv") as f:
        [row] = list(csv.DictReader(f))
    assert row["status"] == "failed" and row["reason"].startswith("interrupted"), row
    assert json.loads((out / "worklist.json").read_text())["status"] == "failed"


def test_triage_from_a_fresh_folder_leaves_it_empty_and_stderr_free_of_native_noise(tmp_path):
    """cuCIM's cuFile start-up (no GPU driver) printed "dlopen error libcuda.so.1 ... cuFile initialization
    failed" on every run and wrote ./cufile.log wherever the command ran; both are kept away"""
    import os
    import subprocess
    import sys

    here = tmp_path / "fresh"
    here.mkdir()
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUFILE_")}
    res = subprocess.run([str(Path(sys.executable).parent / "cellvit-optimus"), "triage", "--out", str(out),
                          "--nuclei-mpp", "4", "--overlap", "32", "-q"], capture_output=True, text=True,
                         timeout=900, cwd=here, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(os.listdir(here)) == []
    for noise in ("cuFile", "cufile", "libcuda", "cuda symbols"):
        assert noise not in res.stderr and noise not in res.stdout, res.stderr[-2000:]
    assert res.stdout.splitlines()[-1].startswith("worklist: ")  # results on stdout, untouched
    assert (out / "worklist.csv").is_file()
    # never silent, even with -q: a plan line for the slide (tiles, ETA) on stderr
    [plan] = [ln for ln in res.stderr.splitlines() if ln.startswith("plan: ")]
    assert plan.startswith("plan: cmu_small_region.svs: 2 tiles; "), plan


def test_kernels_cached_is_false_before_the_first_compile(tmp_path):
    """the CLI's "compiling the nuclei kernels" notice rests on this: an empty Numba cache says False
    (imports the kernel modules, compiles nothing)"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    code = "from cellvit_optimus.kernels import kernels_cached as k; print(k())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.stdout.strip() == "False", res.stderr[-2000:]
    assert not list(tmp_path.rglob("*.nbc"))  # nothing compiled
