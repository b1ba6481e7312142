"""Option types and checks shared by the command-line modules (``cli`` and ``cli_models``).

They live apart from ``cli`` so that ``cli_models`` can use them without importing ``cli``, which
registers ``cli_models``' commands when it is imported (a cycle). Every check runs in click, before a
command's body: a bad value fails at once with the flag's own name and exit code 2, no model loaded.
"""

from __future__ import annotations

import re
from typing import Any

import click

__all__ = ("MPP", "DEVICE", "DEVICE_HELP", "SLIDE_SUFFIXES", "validate_device")

#: file suffixes a folder is searched for: ``slide.iter_slide_paths``' default, repeated so that reading
#: the command line imports no numpy (a test keeps them equal)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".dcm", ".scn", ".bif", ".mrxs", ".vms", ".svslide")

#: a level-0 / image resolution in microns per pixel (the slide readers accept 0.05..50)
MPP = click.FloatRange(0.05, 50)

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_HELP = "cpu, cuda, cuda:N, mps, or auto (cuda when available, else cpu)"


def validate_device(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> str | None:
    """click callback: a torch device name (checked by form only; torch is not imported for it)"""
    if value is not None and not _DEVICE_RE.match(value):
        raise click.BadParameter(f"{value!r} is not a device; use {DEVICE_HELP}", ctx=ctx, param=param)
    return value


#: keyword arguments of a ``--device`` option: ``click.option("--device", **DEVICE)``
DEVICE: dict[str, Any] = dict(default="auto", show_default=True, callback=validate_device, help=DEVICE_HELP)
