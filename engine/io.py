"""Atomic output writing: every file appears whole or not at all.

Writers go to a temporary file in the destination folder, fsync it and ``os.replace`` it into
place, so an interrupted run (even kill -9) leaves either the previous complete file or nothing,
plus at most a ``.tmp-*`` file that the next run removes. Temporaries carry this process's run id
(:data:`RUN_ID`), and the clean-up runs only under the output folder's lock (:func:`folder_lock`),
so one run never deletes another live run's files.

Also here: the output name of a slide (:func:`output_names`), which must never leave the output
folder, land on one of its reserved names or on another input's outputs; :func:`write_guard`, which
turns a full disk or another OS error while writing into a named :class:`~.errors.OutputWriteError`;
:func:`file_digest`, the checksum a finished slide records of each file it delivers; and
:func:`escape_path`, a file name as text any reader takes (names need not be UTF-8).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_optimus.engine.errors import OutputLockedError, OutputWriteError
from cellvit_optimus.engine.jsondoc import FileDigest

__all__ = ("AtomicFile", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_write_png", "clean_stale_temporaries", "TMP_PREFIX", "RUN_ID", "RESERVED_NAMES",
           "LOCK_NAME", "output_name", "output_names", "folder_lock", "move_aside", "write_guard",
           "escape_path", "file_digest", "digest_problem")

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
#: this process's run id: in every temporary it writes, and in the lock file while it holds it
RUN_ID = f"{os.getpid()}-{secrets.token_hex(4)}"
#: the lock file of an output folder (see folder_lock)
LOCK_NAME = ".optimus.lock"
#: names an output folder uses for itself: a slide may never be written under one of them
RESERVED_NAMES = frozenset({"features", "worklist.csv", "worklist.json", "site_state.json", LOCK_NAME})
_UMASK = os.umask(0)
os.umask(_UMASK)


class AtomicFile:
    """the one atomic writer: a temporary beside ``dest`` (named for this run: ``TMP_PREFIX`` + name +
    ``RUN_ID``, so the start-up clean-up of another run never takes it for stale) that :meth:`commit`
    fsyncs and renames over ``dest``, or :meth:`abort` removes. Readers of ``dest`` see the old file or
    the new one, never half of one. An OS error (disk full, read-only) on the way is a named
    :class:`OutputWriteError`. For writers that fill the file over time (the feature HDF5); one-shot
    writes use :func:`atomic_path` / :func:`atomic_write_bytes`."""

    def __init__(self, dest: str | os.PathLike[str]) -> None:
        self.dest = Path(dest)
        with write_guard(self.dest):
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{self.dest.name}.{RUN_ID}.", dir=self.dest.parent)
            os.close(fd)
        self.tmp = Path(tmp)
        with contextlib.suppress(OSError):
            os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files

    def commit(self) -> Path:
        try:
            with write_guard(self.dest):
                # again: some writers (safetensors) replace the file, which brings back mkstemp's 0600
                os.chmod(self.tmp, 0o666 & ~_UMASK)
                with open(self.tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(self.tmp, self.dest)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(self.dest.parent)
        return self.dest

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.tmp.unlink()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """yield a temporary path beside ``dest``; on success it replaces ``dest`` atomically
    (an :class:`AtomicFile`)"""
    f = AtomicFile(dest)
    try:
        # disk full, quota, read-only while writing: one named error instead of a bare OSError
        with write_guard(f.dest):
            yield f.tmp
    except BaseException:
        f.abort()  # no temporary left, whatever went wrong
        raise
    f.commit()


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
    """remove temporaries left by an interrupted run; returns how many were removed

    Call it only while holding the folder's lock (:func:`folder_lock`): then no other run writes
    there. This process's own live temporaries (its :data:`RUN_ID`) are kept either way.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.rglob(TMP_PREFIX + "*"):
        if f".{RUN_ID}" in p.name:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# output names
# --------------------------------------------------------------------------------------------------

#: characters kept as they are in an output name; everything else (separators, control characters,
#: spaces, shell and Windows-reserved characters) becomes "_"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_NAME = 120  # well under NAME_MAX (255 bytes) with ".h5", the temporary prefix and suffixes


def _path_tag(path: Path) -> str:
    # the path as the OS resolves it (links followed), never as text: "a/lnk/../x" is not "a/x"
    return hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:8]


def output_name(path: str | os.PathLike[str], *, clash: bool = False) -> str:
    """the folder / file name of a slide's outputs: its stem when that is a safe, ordinary name,
    else the cleaned stem plus a tag of the slide's real path

    Safe means: only ``[A-Za-z0-9._+-]``, not starting with ``.`` (so never ``.``/``..``, a hidden
    file or a temporary), not a reserved name of the output folder (case-insensitively: some file
    systems fold case). ``clash=True`` (another input has the same name) also adds the tag, so two
    slides never share outputs; the tag depends only on the path, so the name is stable.
    """
    p = Path(path)
    stem = p.stem
    clean = _UNSAFE.sub("_", stem)[:_MAX_NAME]
    ok = (clean == stem and not clean.startswith(".") and clean.lower() not in RESERVED_NAMES
          and not clean.lower().startswith(TMP_PREFIX))
    if ok and not clash:
        return stem
    base = clean.lstrip(".") or "slide"
    return f"{base}-{_path_tag(p)}"


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """whether two recorded paths name the same file (compared resolved and escaped: a feature file
    records its slide's path escaped, see :func:`escape_path`)"""
    return escape_path(os.path.realpath(a)) == escape_path(os.path.realpath(b))


def output_names(paths: Sequence[str | os.PathLike[str]],
                 owner: Callable[[str], str | None] | None = None) -> dict[str, str]:
    """``{str(path): output name}`` for a batch (see :func:`output_name`)

    Names that two different inputs would share (case-insensitively) get every such input's path tag,
    whatever their order. ``owner(name)`` says which slide the outputs already under ``name`` belong
    to (None: nothing there): a name held by another slide, from an earlier batch into the same output
    folder, is not taken over; this input gets its tagged name, with a warning that says so. Of inputs
    that share a name, the one whose outputs already carry it keeps it (so a later batch naming both
    still finds the earlier one's results).
    """
    first = {str(p): output_name(p) for p in paths}
    seen: dict[str, set[str]] = {}
    for p, n in first.items():
        seen.setdefault(n.lower(), set()).add(os.path.realpath(p))
    held: dict[str, str | None] = {}

    def holder(n: str) -> str | None:
        if n not in held:
            held[n] = owner(n) if owner is not None else None
        return held[n]

    names: dict[str, str] = {}
    kept: set[str] = set()  # (lower-case) names an input of a clash keeps because its outputs are there
    for p in sorted(first):
        n = first[p]
        if len(seen[n.lower()]) == 1:
            names[p] = n
        elif n.lower() not in kept and (h := holder(n)) is not None and _same_file(h, p):
            names[p] = n  # in a clash, the input whose outputs already carry the name keeps it
            kept.add(n.lower())
        else:
            names[p] = output_name(p, clash=True)
    for p in first:
        n = names[p]
        if n != first[p] or len(seen[n.lower()]) > 1:
            continue  # tagged, or kept as its holder's: a tag is the path's own
        h = holder(n)
        if h is not None and not _same_file(h, p):
            names[p] = output_name(p, clash=True)
            log.warning("%s: the outputs named %r are another slide's (%s); this one is written as %r",
                        escape_path(p), n, escape_path(h), names[p])
    names = {p: names[p] for p in first}  # in input order
    if len(set(n.lower() for n in names.values())) < len({os.path.realpath(p) for p in names}):
        raise AssertionError("output names are not unique")  # path tags collide: 2**-32 per pair
    return names


def escape_path(path: str | os.PathLike[str]) -> str:
    """``path`` as text that every UTF-8 reader takes: a name the OS accepted but that is not UTF-8
    (Python holds its bytes as lone surrogates) has those bytes written as ``\\xNN``; any other
    name is returned as it is"""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------------------------------
# checksums of delivered files
# --------------------------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 20) -> FileDigest:
    """``{"bytes": size, "sha256": hex}`` of a file, read in chunks (bounded memory)"""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return {"bytes": n, "sha256": h.hexdigest()}


def digest_problem(path: str | os.PathLike[str], want: Any) -> str | None:
    """what is wrong with ``path`` against its recorded :func:`file_digest` ``want`` (missing, another
    size, another checksum), or None when it matches"""
    ok = isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)
    if not ok:
        return "no usable checksum recorded for it"
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if size != want["bytes"]:
        return f"{size} bytes where {want['bytes']} were written"
    try:
        got = file_digest(path)["sha256"]
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if got != want["sha256"]:
        return "content does not match the checksum recorded when it was written"
    return None


# --------------------------------------------------------------------------------------------------
# one run per output folder
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], timeout_s: float | None = None,
                poll_s: float = 0.5) -> Iterator[Path]:
    """hold the exclusive lock of an output folder for the block

    A second run on the same folder waits (``timeout_s=None``: as long as it takes; ``0``: not at all)
    and then raises :class:`OutputLockedError` naming the folder and the holder. The lock is an
    ``flock`` on ``folder/.optimus.lock``: the kernel drops it when its holder dies (even kill -9),
    so a crashed run never leaves the folder locked. (On network file systems without ``flock``
    semantics two hosts are not kept apart; Ray runs lock on the head.)
    """
    import fcntl  # here: POSIX only, and the rest of this module imports on any platform

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        t0 = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputWriteError(path, f"cannot lock the output folder: {exc.strerror}") from exc
            holder = _lock_holder(path)
            waited = time.monotonic() - t0
            if timeout_s is not None and waited >= timeout_s:
                raise OutputLockedError(folder, f"another run ({holder}) is writing to it; "
                                        f"gave up after {waited:.0f} s")
            if not announced:
                log.warning("%s: another run (%s) is writing here; waiting for it to finish", folder, holder)
                announced = True
            time.sleep(poll_s)
        # who holds it, for the message a waiting run prints (advisory text; the flock is the lock)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"run {RUN_ID} pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown run"
    except OSError:
        return "unknown run"


# --------------------------------------------------------------------------------------------------
# bad files and failed writes
# --------------------------------------------------------------------------------------------------


def move_aside(path: str | os.PathLike[str], why: str, kind: str = "bad",
               then: str = "recomputing") -> Path | None:
    """rename an unusable output or cache file to ``<name>.<kind>-<time>`` (kept for inspection, never
    read again) and log a warning naming it and ``why``; ``then`` says what happens next. Returns the
    new path (None if it vanished meanwhile)"""
    path = Path(path)
    dest = path.with_name(f"{path.name}.{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}")
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s: %s; could not move it aside (%s); %s", escape_path(path), why, exc, then)
        return None
    log.warning("%s: %s; moved aside to %s; %s", escape_path(path), why, escape_path(dest.name), then)
    return dest


@contextlib.contextmanager
def write_guard(path: str | os.PathLike[str]) -> Iterator[None]:
    """turn an OS error while writing ``path`` (disk full, quota, read-only, I/O error) into a named
    :class:`OutputWriteError` (reason ``"disk full"`` for ENOSPC/EDQUOT)"""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        raise OutputWriteError.from_os_error(path, exc) from exc

