"""``cellvit-optimus doctor``: what this installation can do, each fact PASS / WARN / FAIL with its fix.

Checks are cheap (no model forward, no network): Python and torch versions, the CUDA device, the slide
readers (cuCIM, tiffslide), Numba and where it caches compiled kernels, the bundled nuclei model and its
safety states, the H-optimus-0 weights in the local Hugging Face cache, and the output folder. A FAIL
means the default job (``cellvit-optimus triage``) cannot run; a WARN names a feature that is off.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cellvit_optimus.engine.errors import OptimusError

__all__ = ("Check", "doctor_command", "run_checks")

Status = Literal["PASS", "WARN", "FAIL"]


@dataclass(frozen=True)
class Check:
    """one fact about the installation"""

    name: str
    status: Status
    detail: str
    #: what to do about a WARN or FAIL ("" for PASS)
    fix: str = ""


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # any import failure is the finding (missing, broken binary, wrong ABI)
        return None
    return str(getattr(mod, "__version__", "?"))


def _python() -> Check:
    v = sys.version_info
    ok = v >= (3, 10)
    return Check("python", "PASS" if ok else "FAIL", f"{sys.version.split()[0]} ({sys.executable})",
                 "" if ok else "use Python 3.10 or newer")


def _torch(device: str) -> Iterator[Check]:
    tv = _version("torch")
    if tv is None:
        yield Check("torch", "FAIL", "not importable", "pip install 'torch>=2.11,<2.15'")
        return
    import torch

    yield Check("torch", "PASS", f"{tv}, {torch.get_num_threads()} CPU threads")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        yield Check("cuda", "PASS", f"{name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, "
                                    f"CUDA {torch.version.cuda}")
    elif device == "cuda":
        yield Check("cuda", "FAIL", f"no CUDA device (torch {tv}, built for CUDA {torch.version.cuda})",
                    "run with --device cpu, or install a CUDA build of torch on a GPU machine")
    else:
        yield Check("cuda", "WARN", "no CUDA device: runs on the CPU (minutes per slide)",
                    "on a GPU machine install a CUDA build of torch")


def _readers() -> Iterator[Check]:
    cv = _version("cucim")
    if cv is None:
        yield Check("cucim", "WARN", "not installed: slides are read with tiffslide (same pixels, slower)",
                    'pip install --no-deps "cucim-cu13==26.10.*"')
    else:
        yield Check("cucim", "PASS", f"{cv} (primary slide reader)")
    tv = _version("tiffslide")
    yield (Check("tiffslide", "PASS", f"{tv} (fallback reader)") if tv is not None
           else Check("tiffslide", "FAIL", "not importable", "pip install 'tiffslide>=2.4'"))


def _numba() -> Check:
    nv = _version("numba")
    if nv is None:
        return Check("numba", "FAIL", "not importable (the nuclei post-processing kernels need it)",
                     "pip install 'numba>=0.60'")
    cache = os.environ.get("NUMBA_CACHE_DIR")
    where = Path(cache) if cache else Path(importlib.import_module("cellvit_optimus.kernels").__file__).parent
    writable = _writable(where)
    if not writable:
        return Check("numba", "WARN", f"{nv}; kernel cache folder {where} is not writable: every run "
                                      "compiles the kernels again (about a minute)",
                     "set NUMBA_CACHE_DIR to a writable folder")
    return Check("numba", "PASS", f"{nv}; compiled kernels cached in {where}")


def _writable(folder: Path) -> bool:
    """whether ``folder`` (or, where it does not exist yet, its nearest existing parent) is writable"""
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    return probe.is_dir() and os.access(probe, os.W_OK)


def _bundled() -> Iterator[Check]:
    from cellvit_optimus.engine.data import DATA_DIR, bundled_slide, default_nuclei_model

    p = default_nuclei_model()
    try:
        from cellvit_optimus.heads.checkpoint import read_metadata

        meta = read_metadata(p)
        mb = p.stat().st_size / 2**20
        yield Check("nuclei model", "PASS", f"{p.name}, {mb:.1f} MB, backbone {meta.get('backbone_id', '?')} "
                                            f"({meta.get('backbone_hash', '?')[:19]}...)")
    except (OptimusError, OSError) as exc:
        yield Check("nuclei model", "FAIL", str(exc), "reinstall the package (pip install --force-reinstall "
                                                      "--no-deps cellvit-optimus) or pass --nuclei-weights")
    for name, what in (("default_ood.npz", "OOD reference"), ("default_nuclei_conformal.json", "type calibration")):
        f = DATA_DIR / name
        yield (Check(what, "PASS", f"{name}, {f.stat().st_size / 1024:.0f} kB") if f.is_file()
               else Check(what, "WARN", f"{f} missing: tiles are never tagged reliable on that signal",
                          "reinstall the package"))
    s = bundled_slide()
    yield (Check("bundled slide", "PASS", f"{s.name}, {s.stat().st_size / 2**20:.1f} MB") if s.is_file()
           else Check("bundled slide", "FAIL", f"{s} missing", "reinstall the package"))


def _hoptimus() -> Check:
    try:
        from cellvit_optimus.heads.backbone import resolve_weights

        path = resolve_weights("hf-hub", "hoptimus0")
        return Check("H-optimus-0", "PASS", f"weights in the local cache: {path}")
    except Exception as exc:  # not cached (the usual case): only --backbone hoptimus0 needs them
        return Check("H-optimus-0", "WARN", f"not in the local Hugging Face cache ({type(exc).__name__}); only "
                                            "--backbone hoptimus0 needs it",
                     "accept the licence at huggingface.co/bioptimus/H-optimus-0, then "
                     "huggingface-cli download bioptimus/H-optimus-0 on a machine with network")


def _output(out: Path) -> Check:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if out.exists() and not out.is_dir():
        return Check("output folder", "FAIL", f"{out} exists and is not a folder", "choose another --out")
    if not os.access(probe, os.W_OK):
        return Check("output folder", "FAIL", f"{probe} is not writable", "choose a writable --out")
    free = shutil.disk_usage(probe).free / 2**30
    if free < 1.0:
        return Check("output folder", "WARN", f"{out}: only {free:.2f} GiB free",
                     "free space: a slide writes tens of MB (cells, features, overview)")
    return Check("output folder", "PASS", f"{out}: writable, {free:.0f} GiB free")


def run_checks(out: str | os.PathLike[str] = "out", device: str = "auto") -> list[Check]:
    """every check, in order (none raises: a failure is a FAIL row)"""
    steps: list[Callable[[], Check | Iterator[Check]]] = [
        _python, lambda: _torch(device), _readers, _numba, _bundled, _hoptimus, lambda: _output(Path(out))]
    rows: list[Check] = []
    for step in steps:
        try:
            got = step()
            rows.extend([got] if isinstance(got, Check) else list(got))
        except Exception as exc:  # a check that breaks is itself a finding, never a traceback
            rows.append(Check(getattr(step, "__name__", "check").lstrip("_"), "FAIL",
                              f"the check raised {type(exc).__name__}: {exc}", "report this"))
    return rows


def doctor_command():  # the click command, built on first use so that importing this module stays light
    import click

    @click.command("doctor")
    @click.option("--out", "out_dir", default="out", show_default=True, type=click.Path(),
                  help="output folder to check for write access and free space")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                  help="the device you will run on (cuda: a missing GPU is a FAIL, not a WARN)")
    def doctor(out_dir: str, device: str) -> None:
        """Check this installation: each fact PASS / WARN / FAIL with its fix; exit 1 on any FAIL."""
        rows = run_checks(out_dir, device)
        width = max(len(r.name) for r in rows)
        for r in rows:
            click.echo(f"{r.status:<4}  {r.name:<{width}}  {r.detail}")
            if r.fix:
                click.echo(f"{'':<4}  {'':<{width}}  fix: {r.fix}")
        n_fail = sum(r.status == "FAIL" for r in rows)
        n_warn = sum(r.status == "WARN" for r in rows)
        click.echo(f"{len(rows)} checks: {n_fail} FAIL, {n_warn} WARN")
        sys.exit(1 if n_fail else 0)

    return doctor
