"""The README's code runs as written: its Python blocks end to end on the bundled slide, and every
``cellvit-optimus`` command it shows parses (subcommand and flags exist).

The Python blocks run as one script in a fresh interpreter (the async block continues the sync one).
One edit keeps it cheap on two CPU cores: ``TriageConfig()`` becomes the coarse nuclei resolution the
triage tests use (4 um/px, a handful of tiles instead of 123); everything else is the README's text.
Where geopandas (optional, not a test dependency) is missing, the README's ``to_geodataframe()`` line
must fail as it says: an ImportError that tells the user to ``pip install geopandas``.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
COARSE = "TriageConfig(nuclei_mpp=4.0, overlap_px=32)"
GEO_LINE = "gdf = cells.to_geodataframe()"
GEO_CHECK = ("try:\n    cells.to_geodataframe()\nexcept ImportError as exc:\n"
             "    assert 'pip install geopandas' in str(exc), exc\n    print('GEOPANDAS-MISSING-OK')\n"
             "else:\n    raise AssertionError('to_geodataframe() ran without geopandas')\n")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_python_blocks_run_on_the_bundled_slide(tmp_path):
    blocks = _blocks("python")
    assert len(blocks) >= 2, "README lost its library snippets"
    script = "\n".join(blocks)
    assert script.count("TriageConfig()") == 1, "the snippet's config changed: update COARSE here"
    script = script.replace("TriageConfig()", COARSE)
    geopandas = importlib.util.find_spec("geopandas") is not None
    if not geopandas:
        [line] = [ln for ln in script.splitlines() if ln.startswith(GEO_LINE)]
        script = script.replace(line, GEO_CHECK)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    # sync: one result line, then status and the worklist files; async: the same slide again (cached)
    sync = [ln for ln in lines if ln.startswith("cmu_small_region review ")]
    assert len(sync) == 2, res.stdout
    assert "new site: first 30 slides stay in review (1 of 30)" in sync[0]  # cold start: the site's first slide
    status = next(ln for ln in lines if ln.startswith("complete "))
    out = (tmp_path / "out").resolve()  # paths in results are absolute (README: one path convention)
    assert [Path(p).resolve() for p in status.split()[1:]] == [out / "worklist.csv", out / "worklist.json"]
    with open(tmp_path / "out" / "worklist.csv") as f:
        [row] = list(csv.DictReader(f))
    assert row["slide"] == "cmu_small_region" and row["status"] == "done"
    assert float(row["priority"]) == pytest.approx(float(sync[0].split()[2]), abs=1e-3)
    assert (tmp_path / "out" / "cmu_small_region" / "summary.json").is_file()
    assert geopandas or "GEOPANDAS-MISSING-OK" in lines


def _commands() -> list[list[str]]:
    """every ``cellvit-optimus ...`` command in the README's bash blocks and inline code"""
    text = README.read_text()
    found = []
    for block in _blocks("bash"):
        for part in re.split(r"&&|\n", block):
            found.append(part.strip())
    found += re.findall(r"`(cellvit-optimus [^`]+)`", text)
    return [c.split()[1:] for c in found if c.startswith("cellvit-optimus ")]


def test_readme_commands_use_existing_subcommands_and_flags():
    from cellvit_optimus.engine.cli import cli

    commands = _commands()
    assert any(c[:1] == ["triage"] for c in commands)
    for args in commands:
        cmd: click.Command = cli
        rest = list(args)
        while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
            sub = cmd.get_command(click.Context(cmd), rest.pop(0))
            assert sub is not None, f"README: unknown command in {' '.join(args)}"
            cmd = sub
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        flags = [re.sub(r"[\[\]]", "", t).split("=")[0] for t in rest if re.sub(r"[\[\]]", "", t).startswith("-")]
        unknown = [f for f in flags if f not in known and f not in ("-h", "--help")]
        assert not unknown, f"README: {' '.join(args)} uses {unknown}, not options of {cmd.name}"
