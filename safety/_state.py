"""Versioned, id-stamped state files shared by the calibration, conformal and OOD states.

A fitted safety state is only valid for the model and backbone it was fitted on; every state file
records those ids (and the backbone weights hash where it matters), and loading refuses a state
whose ids differ from the caller's with :class:`StateMismatchError` naming both sides.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cellvit_optimus.engine.errors import ConfigError, StateMismatchError

#: bumped whenever the layout of a state file changes incompatibly
STATE_VERSION = 1
#: the engine's temporary-file prefix (cellvit_optimus.engine.io.TMP_PREFIX; leaf packages import only
#: error types from the engine, so it is repeated here and a test keeps the two equal)
_TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """write ``data`` to ``path`` so readers see either the old or the new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the engine's temporary prefix, so an interrupted write is removed by its start-up clean-up
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a state file is an ordinary shared file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


def read_json(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """read a state file written by :func:`atomic_write_json` and check its kind and version."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {kind} state ({exc})") from exc
    check_header(obj, kind, path)
    return obj


def check_header(obj: Mapping[str, Any], kind: str, path: str | os.PathLike[str]) -> None:
    if not isinstance(obj, Mapping) or obj.get("kind") != kind:
        got = obj.get("kind") if isinstance(obj, Mapping) else type(obj).__name__
        raise StateMismatchError(f"{path}: expected a {kind!r} state, found {got!r}")
    if obj.get("version") != STATE_VERSION:
        raise StateMismatchError(
            f"{path}: {kind} state version {obj.get('version')!r} is not supported (expected {STATE_VERSION})"
        )


def check_ids(path: str | os.PathLike[str], kind: str, saved: Mapping[str, Any], **expected: Any) -> None:
    """refuse a state whose ids differ from the expected ones; ``None`` expectations are not checked."""
    for key, want in expected.items():
        if want is None:
            continue
        have = saved.get(key)
        if have != want:
            raise StateMismatchError(
                f"{path}: {kind} state was fitted for {key}={have!r}, refusing it for {key}={want!r}; "
                f"refit the {kind} state for this {key.split('_')[0]}"
            )
