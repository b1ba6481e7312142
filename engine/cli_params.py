"""Option types and checks shared by the command-line modules (``cli`` and ``cli_models``).

They live apart from ``cli`` so that ``cli_models`` can use them without importing ``cli``, which
registers ``cli_models``' commands when it is imported (a cycle). Every check runs in click, before a
command's body: a bad value fails at once with the flag's own name and exit code 2, no model loaded.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

# resolve_device is the settings module's, re-exported here where the CLI helpers have always had it
from cellvit_optimus.engine.settings import DEFAULT_DEVICE, resolve_device
from cellvit_optimus.engine.errors import OptimusError

__all__ = ("MPP", "DEVICE", "DEVICE_HELP", "HEAD_DTYPE", "HEAD_DTYPES", "POSITIVE", "NON_NEGATIVE",
           "SLIDE_SUFFIXES", "NUCLEI_FORMAT", "MIL_FORMAT", "checkpoint_file", "cuda_device_count", "device_unavailable", "existing_file",
           "read_safetensors_metadata", "resolve_device", "thresholds_file", "unwritable", "validate_device",
           "writable_dir", "writable_file")

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
    """click callback: a torch device name that this machine has (``cuda``: the driver reports the device;
    ``mps``: macOS), checked without importing torch so that a wrong device fails before any model loads"""
    if value is not None and not _DEVICE_RE.match(value):
        raise click.BadParameter(f"{value!r} is not a device; use {DEVICE_HELP}", ctx=ctx, param=param)
    why = None if value is None else device_unavailable(value)
    if why is not None:
        raise click.BadParameter(f"{value!r} is not available: {why}", ctx=ctx, param=param)
    return value


def device_unavailable(device: str) -> str | None:
    """why ``device`` (``cpu``, ``cuda[:N]``, ``mps``, ``auto``) cannot be used here, or None when it can or
    only torch can tell (a CUDA driver that is not Linux's ``libcuda.so.1``)"""
    if device.startswith("mps"):
        return None if sys.platform == "darwin" else "MPS exists on macOS only"
    if not device.startswith("cuda"):
        return None
    count = cuda_device_count()
    if isinstance(count, str):
        return count
    index = int(device.split(":")[1]) if ":" in device else 0
    if count is not None and index >= count:
        return f"this machine has {count} CUDA device(s)" + (" (CUDA_VISIBLE_DEVICES="
                                                              f"{os.environ['CUDA_VISIBLE_DEVICES']!r})"
                                                              if "CUDA_VISIBLE_DEVICES" in os.environ else "")
    return None


def cuda_device_count() -> int | str | None:
    """the CUDA devices the driver reports (it honours ``CUDA_VISIBLE_DEVICES``), asked through the driver
    library itself (milliseconds; torch takes seconds to import); a reason string when there is no usable
    driver; None off Linux, where torch decides later"""
    if not sys.platform.startswith("linux"):
        return None

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver (libcuda.so.1 cannot be loaded)"
    rc = lib.cuInit(0)
    if rc == 100:  # CUDA_ERROR_NO_DEVICE
        return "the CUDA driver finds no device"
    if rc != 0:
        return f"the CUDA driver failed to start (cuInit error {rc})"
    n = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return "the CUDA driver cannot count its devices"
    return n.value


#: keyword arguments of a ``--device`` option: ``click.option("--device", **DEVICE)``
DEVICE: dict[str, Any] = dict(default=DEFAULT_DEVICE, show_default=True, callback=validate_device,
                              help=DEVICE_HELP)

#: ``--head-dtype`` of triage and segment: ``engine.pipeline.nuclei.HEAD_DTYPES``, repeated here so that
#: reading the command line imports no torch (a test keeps them equal)
HEAD_DTYPES = ("fp32", "bf16")
HEAD_DTYPE: dict[str, Any] = dict(
    type=click.Choice(HEAD_DTYPES), default="fp32", show_default=True,
    help="precision of the nuclei decoder, most of a tile's time on a CPU: bf16 about halves it on a CPU with "
         "native bfloat16 (AVX512-BF16 or AMX) at the same validation scores to 0.002 bPQ; the backbone and "
         "the safety layer's features stay as they are")


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


#: ``heads.checkpoint``'s format names, repeated so that checking a checkpoint's header imports no torch
#: (a test keeps them equal)
NUCLEI_FORMAT = "cellvit-optimus/nuclei-head"
MIL_FORMAT = "cellvit-optimus/mil-head"


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """the string metadata in a safetensors file's header (standard library only: the header is an 8-byte
    little-endian length and that much JSON); raises ValueError saying what is wrong with the file"""
    p = Path(path)
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(size - 8, 100 << 20):
            raise ValueError(f"not a safetensors file (header length {n} does not fit a {size}-byte file)")
        try:
            doc = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a safetensors file (its header is not a JSON object)")
    meta = doc.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def checkpoint_file(fmt: str, what: str):  # type: ignore[no-untyped-def]
    """click callback for a head checkpoint of format ``fmt``: its header must say so (read in
    milliseconds; the tensors are checked when the model loads)"""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            found = read_safetensors_metadata(value).get("format")
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{value}: {exc}", ctx=ctx, param=param) from None
        if found != fmt:
            raise click.BadParameter(f"{value}: not a {what} checkpoint (format {found!r}, expected {fmt!r})",
                                     ctx=ctx, param=param)
        return value

    return check


def thresholds_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback for a trust-tag thresholds JSON: loaded now, so that a bad file fails before the
    model loads (``safety`` imports numpy and scipy only)"""
    if value is None:
        return value
    from cellvit_optimus.safety.tags import TagThresholds

    try:
        TagThresholds.load(value)
    except (OptimusError, OSError, ValueError, TypeError) as exc:
        msg = str(exc)
        raise click.BadParameter(msg if value in msg else f"{value}: {msg}", ctx=ctx, param=param) from None
    return value
