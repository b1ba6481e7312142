"""bench/gpu_check.sh, the prepared GPU run, rehearsed on the CPU.

``--dry-run`` (CI runs it here): the device timeline (each step's planned seconds, 6 minutes at most),
the carried size (60 MiB at most, under the device tool's 64), that every requirement of the package
and of the carried wheels is met on the GPU image (CPython 3.12), that the wheels resolve for that
interpreter, that the package installs without build isolation, that every gpu test and bench is
collected with the test data taken from OPTIMUS_SHARED_DATA, that each pytest step of the device run
selects tests, and that the results file is written. It builds the carried wheelhouse when missing
(from the package index, as CI can).

``--simulate``: the device run's own machinery (timeouts, per-step files in $OUT, the aggregate after
every step, the signal trap) with stand-in steps, killed with SIGTERM at a random step: every step that
finished must have its log and JSON in $OUT, the one cut short is recorded as interrupted, and its
process is gone.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20
PLAN_CARRY = 60 * 2**20
PLAN_SECONDS = 6 * 60
STEPS = ["install", "environment", "backbone", "e2e", "residual", "gpu-tests", "budget", "decode", "report"]


def _plan(out: str) -> list[tuple[str, int, int]]:
    return [(m[1], int(m[2]), int(m[3])) for m in
            re.finditer(r"^gpu_check: plan \d\d (\S+)\s+(\d+) s\s+limit\s+(\d+) s", out, re.M)]


def test_gpu_check_dry_run_prints_the_timeline_and_carries_under_60_mib(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_RESULTS_DIR": str(tmp_path)}
    env.pop("OPTIMUS_SHARED_DATA", None)  # the script must point the tests at its own data folder
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    plan = _plan(out)
    assert [n for n, _, _ in plan] == STEPS  # the most valuable measurements first, then tests, then the rest
    total = int(re.search(r"^planned_total_s=(\d+)$", out, re.M).group(1))
    assert total == sum(p for _, p, _ in plan) <= PLAN_SECONDS
    assert all(0 < p <= lim for _, p, lim in plan)  # every step has a limit (timeout -k) above its plan
    carried = int(re.search(r"^carry_bytes=(\d+)$", out, re.M).group(1))
    assert 0 < carried <= PLAN_CARRY < LIMIT, f"{carried / 2**20:.1f} MiB carried"
    assert (REPO / ".gpu_carry" / "wheels").is_dir()
    for line in ("ok       carry size", "ok       requirements covered", "dry-run  install wheels",
                 "dry-run  install package", "dry-run  collect gpu tests and bench", "ok       summary"):
        assert f"gpu_check: {line}" in out, line
    n = int(re.search(r"collect gpu tests and bench: (\d+) collected", out).group(1))
    assert n >= 30  # the gpu tests and benches, each parametrisation counted
    for step in ("backbone", "e2e", "residual", "gpu-tests", "budget", "decode"):  # each selects something
        assert int(re.search(rf"dry-run  step {step} selects: (\d+) tests", out).group(1)) >= 1, step
    [res] = tmp_path.glob("*.json")
    data = json.loads(res.read_text())
    assert data["steps"]["install package"]["status"] == "dry-run"
    assert [t["status"] for t in data["tests"]] == ["passed", "passed"]  # a real read of the carried slide
    assert data["device"]["gpu"] == "dry-run (no CUDA call)"


def _simulate(out_dir: Path, scale: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out_dir),
           "GPU_CHECK_SIMULATE_SCALE": str(scale)}
    return subprocess.Popen(["bash", "bench/gpu_check.sh", "--simulate"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _step_files(out_dir: Path, name: str) -> tuple[Path, Path]:
    i = STEPS.index(name) + 1
    return out_dir / f"{i:02d}-{name}.log", out_dir / f"{i:02d}-{name}.json"


def test_the_simulated_device_run_writes_every_step_and_the_figures(tmp_path: Path) -> None:
    proc = _simulate(tmp_path, 0.005)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    for name in STEPS:
        log, res = _step_files(tmp_path, name)
        assert log.is_file() and json.loads(res.read_text())["status"] == "ok", name
    [agg] = tmp_path.glob("simulated-gpu-*.json")
    data = json.loads(agg.read_text())
    assert data["device"]["gpu"] == "simulated GPU (no CUDA)"
    summary = data["summary"]
    assert summary["backbone"]["fp16-b256"]["graphs_over_eager"] == 1.1
    assert summary["e2e"]["nvjpeg"]["e2e_over_backbone"] == 0.96
    assert summary["decisions"]["residual"]["fp16"]["choice"] == "half"
    assert "gpu_check: decision residual fp16: half" in out


@pytest.mark.parametrize("attempt", range(2))
def test_a_run_killed_midway_keeps_every_finished_steps_log_and_json(tmp_path: Path, attempt: int) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    target = rng.choice(STEPS[:-1])
    why = f"seed {seed}: SIGTERM during step {target}"
    proc = _simulate(tmp_path, 0.02)
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if f"gpu_check: step {target} start" in line:
            planned = dict((n, p) for n, p, _ in _plan("".join(lines)))[target]
            time.sleep(rng.uniform(0.0, 0.5) * planned * 0.02)
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 143, why + "\n" + out[-3000:]
    cut = re.search(r"^gpu_check: SIGTERM at \d+ s, during step (\S+)$", out, re.M)
    assert cut, why + "\n" + out[-3000:]
    done = re.findall(r"^gpu_check: step (\S+) done at", out, re.M)
    assert done == STEPS[: len(done)], why
    # the signal may land just after the target step ended: then between steps, or in the next one
    assert cut[1] in (target, "none", STEPS[STEPS.index(target) + 1]), why
    for name in done:  # every finished step: its log and its JSON, complete
        log, res = _step_files(tmp_path, name)
        assert log.is_file(), f"{why}: {log.name} missing"
        data = json.loads(res.read_text())
        assert data["status"] == "ok" and data["step"] == name, why
        if name in ("backbone", "e2e", "residual", "budget", "decode"):
            assert data["bench"] and data["tests"], f"{why}: {name} lost its results"
    if cut[1] != "none":
        log, res = _step_files(tmp_path, cut[1])
        data = json.loads(res.read_text())
        assert data["status"] == "interrupted" and log.is_file(), why
        pid = re.search(r"pid=(\d+)", log.read_text())
        if pid:  # the stand-in was started: it must not outlive the run
            time.sleep(0.5)
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid[1]), 0)
    later = STEPS[len(done) + (cut[1] != "none"):]
    assert not any(_step_files(tmp_path, n)[1].exists() for n in later), why
    aggregates = [f for f in tmp_path.glob("*.json") if not re.match(r"\d\d-", f.name)]
    assert len(aggregates) == 1, (why, aggregates)
    steps = json.loads(aggregates[0].read_text())["steps"]
    assert set(done) - {"report"} <= set(steps), why
