"""Helpers of bench/gpu_check.sh (the prepared first run on a lent GPU machine): carry size, requirement
coverage, the torch range, the device facts, each step's result file, and the aggregated results file
with one summary line per check and the figures the run is for (backbone tiles/s and % of peak, graphs
over eager, end to end over backbone only, the residual decision).

Standard library only, plus ``packaging`` where present (it is, on the GPU image and in every venv with
pip's vendored copy as a fallback), so that it runs before the package is installed.

    python bench/gpu_check.py carry-size ROOT CARRY_DIR
    python bench/gpu_check.py requirements WHEEL_DIR
    python bench/gpu_check.py torch-range
    python bench/gpu_check.py device --out FILE
    python bench/gpu_check.py step-result --name N --index I --rc RC --seconds S --planned P --limit L \
        --prefix OUT/NN-name [--hint interrupted|skipped] [--aggregate]
    python bench/gpu_check.py simulate-step --name N --prefix P --seconds S
    python bench/gpu_check.py report [--from OUT_DIR] [--out-dir DIR] [--junit XML]... \
        [--step NAME=STATUS:DETAIL]... [--quiet]

Files are written whole or not at all (a temporary file renamed over the target): a run killed while
writing never leaves half a JSON behind. (Not engine/io.py's writer: this runs before the package is
installed.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
#: what the device tool carries at most: the working tree plus the carried folder
CARRY_LIMIT_BYTES = 64 * 2**20
#: what the plan allows itself: 4 MiB below the limit, so one more test file or wheel does not break it
CARRY_PLAN_BYTES = 60 * 2**20
#: the residual decision's thresholds (bench/test_bench_residual.py states them too)
RESIDUAL_MIN_COS = 0.999
RESIDUAL_MAX_TOKENS_REL_ERR = 0.02
RESIDUAL_MIN_SPEEDUP = 1.05

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


def write_json(path: Path, data: Any) -> None:
    """``path`` holds the whole JSON or stays as it was (a temporary file renamed over it)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


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
    ok = total <= CARRY_PLAN_BYTES
    _say("carry size", "ok" if ok else "FAILED",
         f"{total / 2**20:.1f} MiB = working tree {tree / 2**20:.1f} + {carry.name} {extra / 2**20:.1f} "
         f"(plan <= {CARRY_PLAN_BYTES / 2**20:.0f} MiB; the device tool's limit "
         f"{CARRY_LIMIT_BYTES / 2**20:.0f})")
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


# -- device -------------------------------------------------------------------------------------------------


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
            info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                        compute_capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count)
    except Exception as exc:  # noqa: BLE001
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:  # noqa: BLE001
        info["driver"] = None
    return info


def cmd_device(out: Path) -> int:
    info = _device()
    write_json(out, info)
    ok = bool(info.get("gpu"))
    _say("cuda device", "ok" if ok else "FAILED",
         f"{info.get('gpu')} ({info.get('gpu_memory_gib')} GiB), driver {info.get('driver')}, torch "
         f"{info.get('torch')}, cuda {info.get('cuda')}" if ok else "torch.cuda.is_available() is False")
    return 0 if ok else 1


# -- one step's result --------------------------------------------------------------------------------------


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
    """one row per benchmark: name, group, mean seconds and everything the bench recorded (extra_info)"""
    rows = []
    for b in data.get("benchmarks", []):
        stats = b.get("stats") or {}
        mean = round(stats["mean"], 5) if "mean" in stats else None
        rows.append({"name": b.get("name"), "group": b.get("group"), "mean_s": mean,
                     **b.get("extra_info", {})})
    return rows


def _files(prefix: Path) -> dict[str, Path]:
    return {k: Path(f"{prefix}{ext}") for k, ext in
            (("log", ".log"), ("junit", ".xml"), ("bench", ".bench.json"), ("device", ".device.json"),
             ("result", ".json"))}


def _status(rc: int, hint: str) -> str:
    if hint:
        return hint
    return "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"


def cmd_step_result(name: str, index: int, rc: int, seconds: float, planned: float, limit: float, hint: str,
                    prefix: Path) -> int:
    """``<prefix>.json``: the step's status, timing and what it produced (tests, benchmark rows, device)"""
    f = _files(prefix)
    res: dict[str, Any] = {"step": name, "index": index, "status": _status(rc, hint), "rc": rc,
                           "seconds": seconds, "planned_s": planned, "limit_s": limit, "log": f["log"].name,
                           "tests": [], "bench": []}
    problems = []
    if f["junit"].exists():
        try:
            res["tests"] = _junit_cases(f["junit"])
        except ElementTree.ParseError as exc:  # written when the step was cut
            problems.append(f"{f['junit'].name} unreadable: {exc}")
    if f["bench"].exists():
        try:
            data = json.loads(f["bench"].read_text())
            res["bench"] = _bench_rows(data)
            res["machine_info"] = data.get("machine_info")
        except json.JSONDecodeError as exc:
            problems.append(f"{f['bench'].name} unreadable: {exc}")
    if f["device"].exists():
        res["device"] = json.loads(f["device"].read_text())
    if res["status"] not in ("ok", "skipped") and f["log"].exists():
        res["log_tail"] = f["log"].read_text(errors="replace").splitlines()[-25:]
    if problems:
        res["problems"] = problems
    write_json(f["result"], res)
    n = {k: sum(t["status"] == k for t in res["tests"]) for k in ("passed", "failed", "error", "skipped")}
    detail = f"{seconds:g} s (planned {planned:g} s)"
    if res["tests"]:
        detail += f", tests {n['passed']} passed {n['failed'] + n['error']} failed {n['skipped']} skipped"
    if res["bench"]:
        detail += f", {len(res['bench'])} benchmarks"
    _say(f"step {name}", res["status"], detail)
    return 0


# -- the figures the run is for ------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """backbone tiles/s and % of peak (FP16, BF16; graphs, eager, timm eager), graphs over eager, end to
    end over backbone only per read path, the 12 GiB fit, decode rates, and the residual decision"""
    out: dict[str, Any] = {"backbone": {}, "e2e": {}, "residual": {}, "budget": None, "decode": {}}
    for r in rows:
        tps = _num(r.get("tiles_per_s"))
        mode = r.get("mode")
        if mode in ("runner", "timm-eager") and tps is not None:
            key = f"{r.get('dtype')}-b{r.get('batch')}"
            d = out["backbone"].setdefault(key, {})
            col = "timm_eager" if mode == "timm-eager" else ("graphs" if r.get("graphs") else "eager")
            d[f"{col}_tiles_per_s"] = tps
            d[f"{col}_fraction_of_peak"] = r.get("fraction_of_fp16_peak")
        elif r.get("stage") == "extract end to end" and tps is not None:
            out["e2e"][str(r.get("decoder"))] = {k: r.get(k) for k in (
                "tiles_per_s", "backbone_only_tiles_per_s", "e2e_over_backbone", "timings",
                "runner_stages_4_rounds")}
        elif str(r.get("stage", "")).startswith("backbone-only") and tps is not None:
            out["e2e"]["backbone_only"] = {"tiles_per_s": tps, "batch": r.get("batch")}
        elif r.get("residual") in ("fp32", "half") and tps is not None:
            out["residual"].setdefault(str(r.get("dtype")), {})[str(r["residual"])] = {k: r.get(k) for k in (
                "tiles_per_s", "fraction_of_fp16_peak", "emb_cos_min", "emb_cos_mean", "tokens_rel_err",
                "finite")}
        elif str(r.get("group", "")).endswith("budget"):
            out["budget"] = {k: r.get(k) for k in ("batch_size", "graphs", "peak_reserved_gb",
                                                   "predicted_peak_gb", "limit_gb", "tiles_per_s")}
        elif str(r.get("group", "")).startswith("read-tiles-decode") and tps is not None:
            out["decode"][f"{r.get('decoder')}@{r['group'].rsplit('-', 1)[-1]}"] = {k: r.get(k) for k in (
                "tiles_per_s", "cpu_tiles_per_s", "mean_abs_diff_vs_cpu", "choose_decoder", "fallbacks")}
    for d in out["backbone"].values():
        g, e = d.get("graphs_tiles_per_s"), d.get("eager_tiles_per_s")
        if g and e:
            d["graphs_over_eager"] = round(g / e, 3)
    out["decisions"] = {"residual": {dt: residual_decision(v) for dt, v in out["residual"].items()}}
    return out


def residual_decision(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """keep the pure half residual for a dtype only if it stays close to FP32 and is measurably faster"""
    a, b = rows.get("fp32"), rows.get("half")
    if not a or not b:
        return {"choice": "fp32", "why": "not both residuals measured: the default stays"}
    speed = (b["tiles_per_s"] / a["tiles_per_s"]) if a.get("tiles_per_s") and b.get("tiles_per_s") else None
    cos, rel = _num(b.get("emb_cos_min")), _num(b.get("tokens_rel_err"))
    close = bool(b.get("finite")) and cos is not None and rel is not None and (
        cos >= RESIDUAL_MIN_COS and rel <= RESIDUAL_MAX_TOKENS_REL_ERR)
    fast = speed is not None and speed >= RESIDUAL_MIN_SPEEDUP
    why = (f"half/fp32 tiles/s {speed:.3f}" if speed else "no speed") + (
        f", half vs FP32: embedding cosine min {cos}, token maps rel. error {rel}" if cos is not None else "")
    return {"choice": "half" if close and fast else "fp32",
            "speedup": None if speed is None else round(speed, 3), "accurate": close, "why": why,
            "thresholds": {"min_cos": RESIDUAL_MIN_COS, "max_tokens_rel_err": RESIDUAL_MAX_TOKENS_REL_ERR,
                           "min_speedup": RESIDUAL_MIN_SPEEDUP}}


# -- the results file ----------------------------------------------------------------------------------------


def results_name(device: dict[str, Any], when: dt.datetime) -> str:
    gpu = str(device.get("gpu") or "unknown-gpu")
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-") or "gpu"
    return f"{slug}-{when:%Y-%m-%d}.json"


_STEP_FILE = re.compile(r"^\d\d-[a-z0-9-]+\.json$")


def _step_results(folder: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(folder.glob("*.json")):
        if _STEP_FILE.match(f.name):
            try:
                out.append(json.loads(f.read_text()))
            except json.JSONDecodeError:  # never half-written (write_json), but not ours to trust blindly
                out.append({"step": f.stem, "status": "unreadable", "tests": [], "bench": []})
    return out


def cmd_report(from_dir: Path | None, out_dir: Path | None, junits: list[Path], steps: list[str],
               quiet: bool = False) -> int:
    when = dt.datetime.now(dt.timezone.utc)
    say = (lambda *a: None) if quiet else _say
    step_results = _step_results(from_dir) if from_dir is not None else []
    device = next((r["device"] for r in step_results if r.get("device")), None)
    if device is None and from_dir is not None:  # a run before its environment step: no torch import here
        device = {"gpu": None, "note": "no device facts yet (the run stopped before its environment step)"}
    elif device is None:
        device = _device()
    result: dict[str, Any] = {"when": when.isoformat(timespec="seconds"), "device": device,
                              "git_commit": None, "steps": {}, "tests": [], "bench": []}
    try:
        result["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                              text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        pass
    failed = 0
    for r in step_results:
        keep = ("status", "rc", "seconds", "planned_s", "limit_s", "log", "problems", "log_tail")
        result["steps"][r["step"]] = {k: r.get(k) for k in keep if r.get(k) is not None}
        result["tests"] += [{**t, "step": r["step"]} for t in r.get("tests", [])]
        result["bench"] += [{**b, "step": r["step"]} for b in r.get("bench", [])]
        failed += r.get("status") not in ("ok", "skipped")
        say(f"step {r['step']}", str(r.get("status")),
            f"{r.get('seconds')} s of {r.get('planned_s')} planned" if r.get("seconds") is not None else "")
    for s in steps:
        name, _, rest = s.partition("=")
        status, _, detail = rest.partition(":")
        result["steps"][name] = {"status": status, "detail": detail}
        say(name, status, detail)
        failed += status not in ("ok", "skipped", "dry-run")
    for j in junits:
        if not j.exists():
            say(f"tests ({j.name})", "FAILED", "no JUnit file: the run did not finish")
            failed += 1
            continue
        result["tests"] += _junit_cases(j)
    for c in result["tests"]:  # the passed ones are counted in the summary line
        if c["status"] != "passed":
            say(c["test"].split("/")[-1], c["status"], f"{c['seconds']} s {c['detail']}".strip())
        failed += c["status"] in ("failed", "error")
    result["summary"] = summary = summarise(result["bench"])
    for key, d in summary["backbone"].items():
        say(f"backbone {key}", "bench", ", ".join(f"{k} {v}" for k, v in d.items() if v is not None))
    for key, d in summary["e2e"].items():
        say(f"e2e {key}", "bench", f"{d.get('tiles_per_s')} tiles/s"
            + (f", e2e/backbone {d['e2e_over_backbone']}" if d.get("e2e_over_backbone") else ""))
    for dtype, d in summary["decisions"]["residual"].items():
        say(f"residual {dtype}", "decision", f"{d['choice']} ({d['why']})")
    n = {s: sum(c["status"] == s for c in result["tests"]) for s in ("passed", "failed", "error", "skipped")}
    folder = out_dir or ROOT / "bench" / "results"
    dest = folder / results_name(device, when)
    write_json(dest, result)
    if device.get("gpu") and from_dir is not None:  # the aggregate written before the device was known
        for stale in folder.glob("unknown-gpu-*.json"):
            stale.unlink()
    say("results", "written", str(dest))
    say("summary", "ok" if not failed else "FAILED",
        f"{n['passed']} tests passed, {n['failed'] + n['error']} failed, {n['skipped']} skipped, "
        f"{len(result['bench'])} benchmarks on {device.get('gpu')}")
    if not quiet:
        print(f"results_file={dest}")
    return 0 if not failed else 1


# -- the CPU rehearsal of the device run --------------------------------------------------------------------


def _fake_bench(name: str) -> list[dict[str, Any]]:
    """plausible rows of each step's benchmarks (same keys as the real ones), marked simulated"""
    rows: list[dict[str, Any]] = []

    def row(test: str, group: str, tps: float, **extra: Any) -> None:
        rows.append({"name": test, "group": group, "stats": {"mean": round(256 / tps, 5)},
                     "extra_info": {"tiles_per_s": tps, "simulated": True, **extra}})

    if name == "backbone":
        for dtype in ("fp16", "bf16"):
            for batch in (64, 256):
                for graphs in (False, True):
                    tps = round(900.0 * (1.1 if graphs else 1.0) * (1.0 if batch == 256 else 0.9), 1)
                    row(f"test_gpu_hoptimus0_runner[{batch}-{'graphs' if graphs else 'eager'}]",
                        f"backbone-gpu-hoptimus0-b{batch}", tps, mode="runner", dtype=dtype, graphs=graphs,
                        batch=batch, fraction_of_fp16_peak=round(tps * 608e9 / 989e12, 4))
    elif name == "e2e":
        row("test_gpu_backbone_only", "e2e-gpu-hoptimus0", 1000.0,
            stage="backbone-only (tiles in host memory)", batch=256)
        for dec, tps in (("slide", 700.0), ("nvjpeg", 960.0)):
            row(f"test_gpu_extract_end_to_end[{dec}]", "e2e-gpu-hoptimus0", tps, stage="extract end to end",
                decoder=dec, e2e_over_backbone=round(tps / 1000, 3), backbone_only_tiles_per_s=1000.0)
    elif name == "residual":
        for dtype in ("fp16", "bf16"):
            for res, tps, cos, rel in (("fp32", 900.0, 1.0, 0.003), ("half", 1000.0, 0.9995, 0.01)):
                row(f"test_gpu_hoptimus0_residual[{dtype}-{res}]",
                    f"backbone-gpu-hoptimus0-residual-{dtype}-b256", tps, dtype=dtype, residual=res,
                    emb_cos_min=cos, emb_cos_mean=cos, tokens_rel_err=rel, finite=True)
    elif name == "budget":
        row("test_gpu_hoptimus0_budget_batch_peaks_under_budget", "backbone-gpu-hoptimus0-budget", 950.0,
            batch_size=128, graphs=8, peak_reserved_gb=10.8, predicted_peak_gb=10.5, limit_gb=10.8)
    elif name == "decode":
        for mpp in ("0.5", "0.7"):
            row(f"test_read_tiles_decode[nvjpeg-{mpp}]", f"read-tiles-decode-{mpp}", 5000.0, decoder="nvjpeg",
                cpu_tiles_per_s=1500.0, mean_abs_diff_vs_cpu=0.3, choose_decoder="gpu", fallbacks=0)
    return rows


def cmd_simulate_step(name: str, prefix: Path, seconds: float) -> int:
    """a stand-in for one device step: takes ``seconds``, then writes what the real step would (JUnit,
    pytest-benchmark JSON, device facts), with plausible values marked simulated"""
    print(f"simulated step {name}: {seconds:.2f} s, pid={os.getpid()}", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.05, max(end - time.monotonic(), 0)))
    f = _files(prefix)
    if name == "environment":
        write_json(f["device"], {"gpu": "simulated GPU (no CUDA)", "python": sys.version.split()[0],
                                 "simulated": True})
    rows = _fake_bench(name)
    if rows:
        write_json(f["bench"], {"machine_info": {"simulated": True}, "benchmarks": rows})
    if rows or name == "gpu-tests":
        cases = [r["name"] for r in rows] or ["test_graph_matches_eager_fp16",
                                              "test_batch_fit_counts_reserved_memory"]
        xml = "".join(f'<testcase classname="simulated.{name}" name="{c}" time="0.01"/>' for c in cases)
        f["junit"].write_text(f'<?xml version="1.0"?><testsuites><testsuite name="{name}">{xml}'
                              "</testsuite></testsuites>\n")
    print(f"simulated step {name}: done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("carry-size")
    c.add_argument("root", type=Path)
    c.add_argument("carry", type=Path)
    r = sub.add_parser("requirements")
    r.add_argument("wheels", type=Path)
    sub.add_parser("torch-range")
    d = sub.add_parser("device")
    d.add_argument("--out", type=Path, required=True)
    sr = sub.add_parser("step-result")
    sr.add_argument("--name", required=True)
    sr.add_argument("--index", type=int, required=True)
    sr.add_argument("--rc", type=int, required=True)
    sr.add_argument("--seconds", type=float, required=True)
    sr.add_argument("--planned", type=float, required=True)
    sr.add_argument("--limit", type=float, required=True)
    sr.add_argument("--hint", default="")
    sr.add_argument("--prefix", type=Path, required=True)
    sr.add_argument("--aggregate", action="store_true", help="then rewrite the results file beside it")
    ss = sub.add_parser("simulate-step")
    ss.add_argument("--name", required=True)
    ss.add_argument("--prefix", type=Path, required=True)
    ss.add_argument("--seconds", type=float, required=True)
    p = sub.add_parser("report")
    p.add_argument("--from", dest="from_dir", type=Path)
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--junit", type=Path, action="append", default=[])
    p.add_argument("--step", action="append", default=[])
    p.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "carry-size":
        return cmd_carry_size(a.root, a.carry)
    if a.cmd == "requirements":
        return cmd_requirements(a.wheels)
    if a.cmd == "torch-range":
        return cmd_torch_range()
    if a.cmd == "device":
        return cmd_device(a.out)
    if a.cmd == "step-result":
        rc = cmd_step_result(a.name, a.index, a.rc, a.seconds, a.planned, a.limit, a.hint, a.prefix)
        if a.aggregate:  # what comes back if the run is cut during the next step
            cmd_report(a.prefix.parent, a.prefix.parent, [], [], quiet=True)
        return rc
    if a.cmd == "simulate-step":
        return cmd_simulate_step(a.name, a.prefix, a.seconds)
    return cmd_report(a.from_dir, a.out_dir, a.junit, a.step, a.quiet)


if __name__ == "__main__":
    sys.exit(main())
