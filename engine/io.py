"""Atomic output writing: every file appears whole or not at all.

Writers go to a temporary file in the destination folder, fsync it and ``os.replace`` it into
place, so an interrupted run (even kill -9) leaves either the previous complete file or nothing,
plus at most a ``.tmp-*`` file that the next run removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ("atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_write_png", "clean_stale_temporaries", "TMP_PREFIX")

TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """yield a temporary path beside ``dest``; on success it replaces ``dest`` atomically"""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + dest.name + ".", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp_path
        # again: some writers (safetensors) replace the file, which brings back mkstemp's 0600
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(dest, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_png(dest: str | os.PathLike[str], image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            Image.fromarray(np.asarray(image)).save(f, format="PNG")


def clean_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """remove temporaries left by an interrupted run; returns how many were removed"""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.rglob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n

