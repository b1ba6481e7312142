"""Versioned, id-stamped state files shared by the calibration, conformal and OOD states.

A fitted safety state is only valid for the model and backbone it was fitted on; every state file
records those ids (and the backbone weights hash where it matters), and loading refuses a state
whose ids differ from the caller's with :class:`StateMismatchError` naming both sides.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cellvit_optimus.engine.errors import ConfigError, StateMismatchError

#: bumped whenever the layout of a state file changes incompatibly
STATE_VERSION = 1
#: how a state reaches disk: ``write(path, data)`` replaces ``path`` atomically. The safety module
#: serialises (``to_bytes``) and never writes files itself: the one atomic writer is the engine's
#: :func:`cellvit_optimus.engine.io.atomic_write_bytes` (temporaries named for the run, cleaned at
#: start-up, disk-full as a named error), passed in where a state is saved while running (ShadowMode).
StateWriter = Callable[[Path, bytes], None]


def json_bytes(obj: Mapping[str, Any]) -> bytes:
    """the bytes of a JSON state file (what :func:`read_json` reads back)"""
    return json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")


def read_json(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """read a JSON state file (see :func:`json_bytes`) and check its kind and version."""
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
