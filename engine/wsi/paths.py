"""Which files a run reads: command-line files and folders expanded into slide paths.

Standard library only (no numpy), so the CLI can expand its inputs and report bad ones before anything
heavy is imported. One walk serves the CLI (:func:`collect_inputs`, which also says what it skipped and
why) and the library (:func:`iter_slide_paths`, the slides alone).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ("SLIDE_SUFFIXES", "SlideInputs", "collect_inputs", "iter_slide_paths")

#: file suffixes a folder is searched for (``cli_params.SLIDE_SUFFIXES`` repeats them; a test keeps them
#: equal)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".dcm", ".scn", ".bif", ".mrxs", ".vms", ".svslide")


class SlideInputs(NamedTuple):
    """The expanded inputs: ``slides`` to run in order, ``skipped`` (path, why) folder entries,
    ``missing`` inputs."""

    slides: list[Path]
    skipped: list[tuple[str, str]]
    missing: list[str]


def collect_inputs(inputs: Sequence[str | os.PathLike[str]], recursive: bool = False,
                   suffixes: tuple[str, ...] = SLIDE_SUFFIXES) -> SlideInputs:
    """expand files and folders into :class:`SlideInputs` ``(slides, skipped, missing)``

    ``slides`` are the files to run, in order (folders: sorted; a missing path stays in the list so that
    the batch reports it with the others); ``skipped`` names every folder entry that is not run, with why;
    ``missing`` lists the inputs that do not exist.
    """
    slides: list[Path] = []
    skipped: list[tuple[str, str]] = []
    missing: list[str] = []

    def walk(folder: Path) -> None:
        children = sorted(folder.iterdir())
        mirax = {c.stem for c in children if c.suffix.lower() == ".mrxs"}
        for child in children:
            if child.is_dir():
                if child.name in mirax:
                    continue  # the data folder of a MIRAX slide, read through its .mrxs file
                if recursive:
                    walk(child)
                else:
                    skipped.append((str(child), "folder (add --recursive to search it)"))
            elif child.name.startswith("."):
                skipped.append((str(child), "hidden file"))
            elif child.suffix.lower() in suffixes:
                slides.append(child)
            else:
                skipped.append((str(child), f"not a slide file type ({child.suffix or 'no suffix'})"))

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            walk(p)
        else:
            if not p.exists():
                missing.append(str(p))
            slides.append(p)
    return SlideInputs(slides, skipped, missing)


def iter_slide_paths(inputs: Sequence[str | os.PathLike[str]],
                     suffixes: tuple[str, ...] = SLIDE_SUFFIXES) -> Iterator[Path]:
    """expand files and directories into slide paths (directories: files with a slide suffix, sorted)"""
    yield from collect_inputs(inputs, suffixes=suffixes).slides
