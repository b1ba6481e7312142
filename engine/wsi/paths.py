"""Which files a run reads: command-line files and folders expanded into slide paths.

Standard library only (no numpy), so the CLI can expand its inputs and report bad ones before anything
heavy is imported. One walk serves the CLI (:func:`collect_inputs`, which also says what it skipped and
why) and the library (:func:`iter_slide_paths`, the slides alone).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ("SLIDE_SUFFIXES", "SlideInputs", "collect_inputs", "file_kind", "iter_slide_paths")

#: file suffixes a folder is searched for (``cli_params.SLIDE_SUFFIXES`` repeats them; a test keeps them
#: equal)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".dcm", ".scn", ".bif", ".mrxs", ".vms", ".svslide")


class SlideInputs(NamedTuple):
    """The expanded inputs: ``slides`` to run in order, ``skipped`` (path, why) folder entries,
    ``missing`` inputs."""

    slides: list[Path]
    skipped: list[tuple[str, str]]
    missing: list[str]


def file_kind(mode: int) -> str | None:
    """what a non-regular file is ("a FIFO", "a socket", ...), None for a regular file"""
    for test, what in ((stat.S_ISREG, None), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def collect_inputs(inputs: Sequence[str | os.PathLike[str]], recursive: bool = False,
                   suffixes: tuple[str, ...] = SLIDE_SUFFIXES) -> SlideInputs:
    """expand files and folders into :class:`SlideInputs` ``(slides, skipped, missing)``

    ``slides`` are the files to run, in order (folders: sorted), each as its real path (links and
    ``..`` resolved by the OS, never as text: the file that will be read); a missing path stays in the
    list so that the batch reports it with the others, and an input given by name is kept whatever it
    is (opening it says what is wrong). ``skipped`` names every folder entry that is not run, with why:
    other file types, hidden files, FIFOs, sockets and devices (never opened: reading one can block
    forever), broken links, folders seen before (a link back up the tree would loop), and files already
    listed (through another link or folder, or a hard link). ``missing`` lists the inputs that do not exist.
    """
    slides: list[Path] = []
    skipped: list[tuple[str, str]] = []
    missing: list[str] = []
    files: dict[tuple[int, int], str] = {}  # (device, inode) -> how it was first listed
    folders: dict[tuple[int, int], str] = {}

    def add(p: Path, given: str, st: os.stat_result | None) -> None:
        if st is not None:
            key = (st.st_dev, st.st_ino)
            if key in files:
                skipped.append((given, f"the same file as {files[key]} (listed once)"))
                return
            files[key] = given
        slides.append(Path(os.path.realpath(p)))

    def walk(folder: Path, st: os.stat_result) -> None:
        folders[(st.st_dev, st.st_ino)] = str(folder)
        try:
            children = sorted(folder.iterdir())
        except OSError as exc:
            skipped.append((str(folder), f"folder cannot be read ({exc.strerror or exc})"))
            return
        mirax = {c.stem for c in children if c.suffix.lower() == ".mrxs"}
        for child in children:
            try:
                cst = child.stat()  # follows links: what reading it would reach
            except OSError as exc:
                why = "broken link" if child.is_symlink() else f"cannot be read ({exc.strerror or exc})"
                skipped.append((str(child), why))
                continue
            if stat.S_ISDIR(cst.st_mode):
                if child.name in mirax:
                    continue  # the data folder of a MIRAX slide, read through its .mrxs file
                if not recursive:
                    skipped.append((str(child), "folder (add --recursive to search it)"))
                elif (cst.st_dev, cst.st_ino) in folders:
                    skipped.append((str(child), f"the same folder as {folders[(cst.st_dev, cst.st_ino)]}, "
                                    "searched once (a link back up the tree would loop)"))
                else:
                    walk(child, cst)
            elif child.name.startswith("."):
                skipped.append((str(child), "hidden file"))
            elif not stat.S_ISREG(cst.st_mode):
                skipped.append((str(child), f"{file_kind(cst.st_mode)}, not a regular file"))
            elif child.suffix.lower() in suffixes:
                add(child, str(child), cst)
            else:
                skipped.append((str(child), f"not a slide file type ({child.suffix or 'no suffix'})"))

    for item in inputs:
        p = Path(item)
        try:
            st = p.stat()
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in folders:
                skipped.append((str(p), f"the same folder as {folders[(st.st_dev, st.st_ino)]}, "
                                "searched once"))
            else:
                walk(p, st)
        else:
            if st is None:
                missing.append(str(p))
            add(p, str(p), st)
    return SlideInputs(slides, skipped, missing)


def iter_slide_paths(inputs: Sequence[str | os.PathLike[str]],
                     suffixes: tuple[str, ...] = SLIDE_SUFFIXES) -> Iterator[Path]:
    """expand files and directories into slide paths (directories: files with a slide suffix, sorted)"""
    yield from collect_inputs(inputs, suffixes=suffixes).slides
