"""Helpers of bench/gpu_check.sh (the prepared first run on a lent GPU machine): carry size, requirement
coverage, the torch range, and the results file with one summary line per check.

Standard library only, plus ``packaging`` where present (it is, on the GPU image and in every venv with
pip's vendored copy as a fallback), so that it runs before the package is installed.

    python bench/gpu_check.py carry-size ROOT CARRY_DIR
    python bench/gpu_check.py requirements WHEEL_DIR
    python bench/gpu_check.py torch-range
    python bench/gpu_check.py report --out FILE [--junit XML]... [--bench JSON] [--step NAME=STATUS:DETAIL]...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
#: what the device tool carries at most: the working tree plus the carried folder
CARRY_LIMIT_BYTES = 64 * 2**20

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pragma: no cover - pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]


def _say(check: str, status: str, detail: str = "") -> None:
    print(f"gpu_check: {status:<8} {check}{':' if detail else ''} {detail}".rstrip(), flush=True)


# -- carry size --------------------------------------------------------------------------------------------


def working_tree_bytes(root: Path) -> int:
    """bytes of the files the device tool sends: tracked plus untracked files git does not ignore"""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    total = 0
    for name in {n for n in out.decode().split("\0") if n}:
        p = root / name
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.exists() else 0


def cmd_carry_size(root: Path, carry: Path) -> int:
    tree, extra = working_tree_bytes(root), dir_bytes(carry)
    total = tree + extra
    ok = total <= CARRY_LIMIT_BYTES
    _say("carry size", "ok" if ok else "FAILED",
         f"{total / 2**20:.1f} MiB = working tree {tree / 2**20:.1f} + {carry.name} {extra / 2**20:.1f} "
         f"(limit {CARRY_LIMIT_BYTES / 2**20:.0f} MiB)")
    print(f"carry_bytes={total}")
    return 0 if ok else 1


# -- requirement coverage -----------------------------------------------------------------------------------


def _left_out(path: Path) -> set[str]:
    """names marked ``!name`` in a list: requirements knowingly not carried"""
    return {canonicalize_name(line.strip()[1:].split("#", 1)[0].strip())
            for line in path.read_text().splitlines() if line.strip().startswith("!")}


def _listed(path: Path) -> dict[str, Version | None]:
    """name -> pinned version (or None) from a requirements-like list"""
    out: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("!"):
            continue
        req = Requirement(line)
        pins = [s.version for s in req.specifier if s.operator == "=="]
        out[canonicalize_name(req.name)] = Version(pins[0]) if pins else None
    return out


def _pyproject_requirements() -> list[str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def _wheel_metadata(wheel: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    head = text.split("\n\n", 1)[0]
    return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in head.splitlines()) if v]


def _wheel_requirements(wheel: Path) -> list[str]:
    return [v for k, v in _wheel_metadata(wheel) if k == "Requires-Dist"]


def _wheel_name_version(wheel: Path) -> tuple[str, Version]:
    name, version = wheel.name.split("-")[:2]
    return canonicalize_name(name), Version(version)


def cmd_requirements(wheels: Path) -> int:
    """every requirement of the package and of each carried wheel is met by a carried wheel or by the
    GPU image (at a version that fits where the image's version is known)"""
    carried = dict(_wheel_name_version(w) for w in sorted(wheels.glob("*.whl")))
    wanted = _listed(ROOT / "bench" / "gpu_wheels.txt")
    missing_wheels = sorted(n for n in wanted if n not in carried)
    device = _listed(ROOT / "bench" / "gpu_device_packages.txt")
    left_out = _left_out(ROOT / "bench" / "gpu_wheels.txt")
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    problems: list[str] = []
    notes: list[str] = []
    sources = [("cellvit-optimus", r) for r in _pyproject_requirements()]
    for w in sorted(wheels.glob("*.whl")):
        sources += [(w.name, r) for r in _wheel_requirements(w)]
        py = [v for k, v in _wheel_metadata(w) if k == "Requires-Python"]
        if py and not Requirement(f"python{py[0]}").specifier.contains("3.12.3"):
            problems.append(f"{w.name} requires Python {py[0]}: not the GPU machine's 3.12")
    for who, text in sources:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # extras and other platforms
        name = canonicalize_name(req.name)
        if name in carried:
            have: Version | None | str = carried[name]
        elif name in device:
            have = device[name]  # None: in the image, version not known
        else:
            have = "absent"
        if have == "absent" and name in left_out:
            notes.append(f"{who} needs {text}: left out on purpose (bench/gpu_wheels.txt)")
        elif have == "absent":
            problems.append(f"{who} needs {text}: neither carried nor in the GPU image")
        elif isinstance(have, Version) and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{who} needs {text}: have {name} {have}")
    for n in missing_wheels:
        problems.append(f"bench/gpu_wheels.txt lists {n} but {wheels} has no wheel of it")
    for p in notes:
        _say("requirement", "skipped", p)
    for p in problems:
        _say("requirement", "FAILED", p)
    _say("requirements covered", "ok" if not problems else "FAILED",
         f"{len(sources)} requirements, {len(carried)} carried wheels, {len(device)} image packages")
    return 0 if not problems else 1


# -- torch ----------------------------------------------------------------------------------------------------


def torch_spec() -> str:
    for r in _pyproject_requirements():
        if canonicalize_name(Requirement(r).name) == "torch":
            return str(Requirement(r).specifier)
    raise SystemExit("pyproject.toml declares no torch requirement")


def cmd_torch_range() -> int:
    from importlib.metadata import PackageNotFoundError, version

    spec = torch_spec()
    try:
        have = version("torch")
    except PackageNotFoundError:
        _say("torch in declared range", "FAILED", f"torch not installed (need {spec})")
        return 1
    ok = Requirement(f"torch{spec}").specifier.contains(Version(have).base_version, prereleases=True)
    _say("torch in declared range", "ok" if ok else "FAILED", f"torch {have}, declared {spec}")
    return 0 if ok else 1


# -- report ---------------------------------------------------------------------------------------------------


def _junit_cases(path: Path) -> list[dict[str, Any]]:
    cases = []
    for tc in ElementTree.parse(path).getroot().iter("testcase"):
        status, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (el.get("message") or el.text or "").strip().splitlines()[0][:160] if (
                    el.get("message") or el.text) else ""
                break
        name = f"{tc.get('classname', '').replace('.', '/')}.py::{tc.get('name')}"
        cases.append({"test": name, "status": status, "seconds": round(float(tc.get("time") or 0), 2),
                      "detail": detail})
    return cases


def _bench_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info", {})
        rows.append({"name": b.get("name"), "group": b.get("group"),
                     "mean_s": round(b["stats"]["mean"], 5) if b.get("stats") else None,
                     **{k: extra[k] for k in ("tiles_per_s", "flops_fraction", "fraction_of_fp16_peak",
                                              "peak_vram_gb", "decoder", "decoder_reason", "batch_size",
                                              "e2e_over_backbone", "mean_abs_diff_vs_cpu", "choose_decoder")
                        if k in extra}})
    return rows


def _device() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    try:
        from importlib.metadata import version

        info["torch"] = version("torch")
    except Exception:  # noqa: BLE001
        info["torch"] = None
    if os.environ.get("GPU_CHECK_DRY_RUN") == "1":
        info["gpu"] = "dry-run (no CUDA call)"
        return info
    try:
        import torch

        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1))
    except Exception as exc:  # noqa: BLE001
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:  # noqa: BLE001
        info["driver"] = None
    return info


def results_name(device: dict[str, Any], when: dt.datetime) -> str:
    gpu = str(device.get("gpu") or "no-gpu")
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-") or "gpu"
    return f"{slug}-{when:%Y-%m-%d}.json"


def cmd_report(out: Path | None, out_dir: Path | None, junits: list[Path], bench: Path | None,
               steps: list[str]) -> int:
    when = dt.datetime.now(dt.timezone.utc)
    device = _device()
    result: dict[str, Any] = {"when": when.isoformat(timespec="seconds"), "device": device,
                              "git_commit": None, "steps": {}, "tests": [], "bench": []}
    try:
        result["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                              text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        pass
    failed = 0
    for s in steps:
        name, _, rest = s.partition("=")
        status, _, detail = rest.partition(":")
        result["steps"][name] = {"status": status, "detail": detail}
        _say(name, status, detail)
        failed += status not in ("ok", "skipped", "dry-run")
    for j in junits:
        if not j.exists():
            _say(f"tests ({j.name})", "FAILED", "no JUnit file: the run did not finish")
            failed += 1
            continue
        for c in _junit_cases(j):
            result["tests"].append(c)
            short = c["test"].split("/")[-1]
            _say(short, c["status"], f"{c['seconds']} s {c['detail']}".strip())
            failed += c["status"] in ("failed", "error")
    if bench is not None and bench.exists():
        data = json.loads(bench.read_text())
        result["bench"] = _bench_rows(data)
        result["benchmark_json"] = data
        for r in result["bench"]:
            tps = f"{r['tiles_per_s']:.0f} tiles/s" if isinstance(r.get("tiles_per_s"), (int, float)) else ""
            more = f" decoder {r['decoder']}" if r.get("decoder") else ""
            _say(str(r["name"]), "bench", f"mean {r['mean_s']} s {tps}{more}".strip())
    elif bench is not None:
        _say("bench", "FAILED", f"no benchmark JSON at {bench}: the bench did not finish")
        failed += 1
    n = {s: sum(c["status"] == s for c in result["tests"]) for s in ("passed", "failed", "error", "skipped")}
    dest = out if out is not None else (out_dir or ROOT / "bench" / "results") / results_name(device, when)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1, default=str) + "\n")
    _say("results", "written", str(dest))
    _say("summary", "ok" if not failed else "FAILED",
         f"{n['passed']} tests passed, {n['failed'] + n['error']} failed, {n['skipped']} skipped, "
         f"{len(result['bench'])} benchmarks on {device.get('gpu')}")
    print(f"results_file={dest}")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("carry-size")
    c.add_argument("root", type=Path)
    c.add_argument("carry", type=Path)
    r = sub.add_parser("requirements")
    r.add_argument("wheels", type=Path)
    sub.add_parser("torch-range")
    p = sub.add_parser("report")
    p.add_argument("--out", type=Path)
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--junit", type=Path, action="append", default=[])
    p.add_argument("--bench", type=Path)
    p.add_argument("--step", action="append", default=[])
    a = ap.parse_args(argv)
    if a.cmd == "carry-size":
        return cmd_carry_size(a.root, a.carry)
    if a.cmd == "requirements":
        return cmd_requirements(a.wheels)
    if a.cmd == "torch-range":
        return cmd_torch_range()
    return cmd_report(a.out, a.out_dir, a.junit, a.bench, a.step)


if __name__ == "__main__":
    sys.exit(main())
