"""The one atomic writer: outputs appear whole or not at all, with ordinary file modes."""

from __future__ import annotations

import os
import stat

import pytest

from cellvit_optimus.engine.io import atomic_path


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_path_gives_ordinary_modes_even_when_the_writer_replaces_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    want = 0o666 & ~_umask()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.bin"
    with atomic_path(a) as tmp:
        save_file({"w": torch.zeros(3)}, str(tmp))  # safetensors writes a new file over the temporary
    with atomic_path(b) as tmp:
        tmp.write_bytes(b"x")
    assert stat.S_IMODE(a.stat().st_mode) == want and stat.S_IMODE(b.stat().st_mode) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.bin"]


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    dest = tmp_path / "summary.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk went away")
    assert dest.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
