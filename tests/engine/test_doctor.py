"""``cellvit-optimus doctor``: every fact of a healthy CPU install passes, and what is wrong is a FAIL with
its fix, never a traceback."""

from __future__ import annotations

from click.testing import CliRunner

from cellvit_optimus.engine.cli import cli
from cellvit_optimus.engine.doctor import run_checks


def test_healthy_cpu_install_exits_0(tmp_path):
    r = CliRunner().invoke(cli, ["doctor", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    rows = {line.split()[1]: line.split()[0] for line in r.output.splitlines() if line[:4] in ("PASS", "WARN", "FAIL")}
    for name in ("python", "torch", "tiffslide", "numba", "nuclei", "bundled"):
        assert rows[name] == "PASS", (name, r.output)
    assert "0 FAIL" in r.output.splitlines()[-1]
    assert not (tmp_path / "out").exists()  # checking the folder does not create it


def test_what_cannot_work_is_a_fail_with_its_fix(tmp_path):
    import torch

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    rows = {c.name: c for c in run_checks(blocked, device="cuda")}
    assert rows["output folder"].status == "FAIL" and str(blocked) in rows["output folder"].detail
    assert rows["output folder"].fix
    if not torch.cuda.is_available():
        assert rows["cuda"].status == "FAIL" and "--device cpu" in rows["cuda"].fix
    r = CliRunner().invoke(cli, ["doctor", "--out", str(blocked)])
    assert r.exit_code == 1 and "fix: choose another --out" in r.output


def test_a_check_that_raises_becomes_a_fail_row(monkeypatch):
    import cellvit_optimus.engine.doctor as doc

    def boom():
        raise RuntimeError("numba ABI mismatch")

    monkeypatch.setattr(doc, "_numba", boom)
    rows = doc.run_checks()
    bad = [c for c in rows if c.status == "FAIL"]
    assert len(bad) == 1 and "RuntimeError: numba ABI mismatch" in bad[0].detail
    assert rows[-1].name == "output folder"  # the checks after it still ran
