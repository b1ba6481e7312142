"""No script that trains, tunes or fits a shipped state reads a held-out image (issue 27).

The held-out images of the bundled nuclei model (bench/train_default_nuclei.py ``HELD_OUT``: the five
CoNSeP test images and three MoNuSeg images) are scored once, by bench/eval_nuclei.py. Every image file
the training and tuning data functions open is recorded here (Pillow, numpy and scipy.io readers) and
checked against the held-out files.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from bench_scripts import BENCH, bench_script

#: scripts whose outputs ship: the weights, their post-processing, the nucleus-type calibration and
#: the OOD state
FITTING_SCRIPTS = ("train_default_nuclei", "tune_postprocess", "fit_nucleus_conformal", "fit_default_ood")


@pytest.fixture
def reads(monkeypatch):
    """paths opened by Pillow, numpy.load and scipy.io.loadmat while the test runs"""
    seen: list[Path] = []
    pil_open, np_load, loadmat = Image.open, np.load, scipy.io.loadmat

    def record(f):
        def wrapped(path, *a, **k):
            if isinstance(path, (str, os.PathLike)):
                seen.append(Path(path).resolve())
            return f(path, *a, **k)
        return wrapped

    monkeypatch.setattr(Image, "open", record(pil_open))
    monkeypatch.setattr(np, "load", record(np_load))
    monkeypatch.setattr(scipy.io, "loadmat", record(loadmat))
    return seen


def held_out_files(nuclei_dir: Path) -> set[Path]:
    held = bench_script("train_default_nuclei").HELD_OUT
    out = {p.resolve() for p in (nuclei_dir / "consep-patches").rglob("*") if p.is_file()}
    for g in held:
        if g.startswith("monuseg/"):
            out |= {p.resolve() for p in (nuclei_dir / "monuseg-train").rglob(f"{g.split('/', 1)[1]}.*")}
    return out


def test_held_out_files_are_what_the_split_names(nuclei_dir):
    files = held_out_files(nuclei_dir)
    # 5 CoNSeP test images x 16 patches x 4 files (image, inst, type_mat, seg_mask) + 3 MoNuSeg x 2
    assert len(files) == 5 * 16 * 4 + 3 * 2


def test_training_and_tuning_data_read_no_held_out_image(reads, nuclei_dir):
    train, val, test = bench_script("train_default_nuclei").splits(held_out=False)
    assert test == [] and len(train) == 31 and len(val) == 6
    assert reads, "the recorder saw no read: the loaders changed how they open files"
    assert not set(reads) & held_out_files(nuclei_dir)
    # the same split with the held-out images does read them (the recorder would see a leak)
    reads.clear()
    bench_script("train_default_nuclei").splits(held_out=True)
    assert set(reads) & held_out_files(nuclei_dir)


def test_the_conformal_calibration_reads_validation_images_only(reads, nuclei_dir):
    samples = bench_script("fit_nucleus_conformal").calibration_samples()
    val = [g for g in bench_script("train_default_nuclei").VAL if g.startswith("consep/")]
    assert sorted(s.group for s in samples) == sorted(val) and len(samples) == 4
    assert reads and not set(reads) & held_out_files(nuclei_dir)


def test_the_ood_reference_reads_no_held_out_image(reads, shared_data, nuclei_dir):
    fit = bench_script("fit_default_ood")
    ind = fit.reference_tiles(shared_data)
    monuseg = {g for g in ind.groups if g.startswith("monuseg/")}
    assert len(monuseg) == 13 + 1 - 3  # MoNuSeg train + the TIAToolbox image, less the held-out three
    assert not monuseg & set(fit.HELD_OUT)
    assert reads and not set(reads) & held_out_files(nuclei_dir)
    # the fit refuses a reference that holds a held-out image's tiles
    with pytest.raises(ValueError, match="held-out"):
        fit.reference_fit(np.zeros((40, 3)), np.array(["monuseg/TCGA-A7-A13E-01Z-00-DX1"] * 40))


def test_fitting_scripts_load_their_data_only_through_the_checked_functions():
    """every ``splits(...)`` call in the fitting scripts passes ``held_out=False``, every ``in_domain``
    call passes the held-out list as ``exclude``, and none calls a raw loader (load_consep /
    load_monuseg / monuseg_tiles) outside the functions checked above"""
    checked = {"all_samples", "splits", "consep_val_draw", "calibration_samples"}

    def calls(node, inside=()):
        for child in ast.iter_child_nodes(node):
            scope = inside + (child.name,) if isinstance(child, ast.FunctionDef) else inside
            if isinstance(child, ast.Call):
                yield scope, child
            yield from calls(child, scope)

    n_splits = n_in_domain = 0
    for name in FITTING_SCRIPTS:
        for scope, node in calls(ast.parse((BENCH / f"{name}.py").read_text())):
            if set(scope) & checked:
                continue
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            assert callee not in ("load_consep", "load_monuseg", "monuseg_tiles"), (name, callee)
            if callee == "in_domain":
                n_in_domain += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("exclude"), ast.Name) and kw["exclude"].id == "HELD_OUT", name
            if callee == "splits":
                n_splits += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("held_out"), ast.Constant) and kw["held_out"].value is False, name
    assert n_splits == 2  # the training and the tuning script
    assert n_in_domain == 1  # the OOD reference
