"""Option types and checks shared by the command-line modules (``cli`` and ``cli_models``).

They live apart from ``cli`` so that ``cli_models`` can use them without importing ``cli``, which
registers ``cli_models``' commands when it is imported (a cycle). Every check runs in click, before a
command's body: a bad value fails at once with the flag's own name and exit code 2, no model loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import click

__all__ = ("MPP", "DEVICE", "DEVICE_HELP", "POSITIVE", "NON_NEGATIVE", "SLIDE_SUFFIXES", "existing_file",
           "resolve_device", "unwritable", "validate_device", "writable_dir", "writable_file")

#: file suffixes a folder is searched for: ``slide.iter_slide_paths``' default, repeated so that reading
#: the command line imports no numpy (a test keeps them equal)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".dcm", ".scn", ".bif", ".mrxs", ".vms", ".svslide")

#: a level-0 / image resolution in microns per pixel (the slide readers accept 0.05..50)
MPP = click.FloatRange(0.05, 50)

#: counts that must be at least one (batch sizes, steps, epochs, threads, workers)
POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_HELP = "cpu, cuda, cuda:N, mps, or auto (cuda when available, else cpu)"


def validate_device(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> str | None:
    """click callback: a torch device name (checked by form only; torch is not imported for it)"""
    if value is not None and not _DEVICE_RE.match(value):
        raise click.BadParameter(f"{value!r} is not a device; use {DEVICE_HELP}", ctx=ctx, param=param)
    return value


#: keyword arguments of a ``--device`` option: ``click.option("--device", **DEVICE)``
DEVICE: dict[str, Any] = dict(default="auto", show_default=True, callback=validate_device, help=DEVICE_HELP)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; any other name unchanged"""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def existing_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback for weights that may also name the Hugging Face cache (``hf-hub[:repo]``)"""
    if value is None or value.startswith("hf-hub"):
        return value
    if not Path(value).is_file():
        raise click.BadParameter(f"{value}: no such file", ctx=ctx, param=param)
    return value


def unwritable(path: str | os.PathLike[str]) -> str | None:
    """why ``path`` cannot be made a folder this process writes into, or None when it can"""
    p = Path(os.path.abspath(path))
    here = p
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        return f"{here} is a file, not a folder"
    if not os.access(here, os.W_OK | os.X_OK):
        return "is not writable" if here == p else f"cannot be created ({here} is not writable)"
    return None


def writable_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback for an output folder: it, or the nearest folder above it that exists, must be a
    folder this process can write to (else the run would fail only after the models are loaded)"""
    why = None if value is None else unwritable(value)
    if why is not None:
        raise click.BadParameter(f"{value}: {why}", ctx=ctx, param=param)
    return value


def writable_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback for an output file (a checkpoint): its folder must be one we can write into, checked
    now rather than after hours of training"""
    why = None if value is None else unwritable(os.path.dirname(os.path.abspath(value)))
    if why is not None:
        raise click.BadParameter(f"{value}: folder {why}" if why.startswith("is") else f"{value}: {why}",
                                 ctx=ctx, param=param)
    return value
