"""bench/gpu_check.sh --dry-run: every step of the prepared GPU run that needs no CUDA, on the CPU.

It builds the carried wheelhouse when missing (from the package index, as CI can), checks that the
working tree plus what is carried stays under the device tool's 64 MiB, that every requirement of the
package and of the carried wheels is met on the GPU image (CPython 3.12), that the wheels resolve for
that interpreter, that the package installs without build isolation, that every gpu test and bench is
collected with the test data taken from OPTIMUS_SHARED_DATA, and that the results file is written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20


def test_gpu_check_dry_run_passes_and_carries_under_64_mib(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_RESULTS_DIR": str(tmp_path)}
    env.pop("OPTIMUS_SHARED_DATA", None)  # the script must point the tests at its own data folder
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    carried = int(re.search(r"^carry_bytes=(\d+)$", out, re.M).group(1))
    assert 0 < carried < LIMIT, f"{carried / 2**20:.1f} MiB carried"
    assert (REPO / ".gpu_carry" / "wheels").is_dir()
    for line in ("ok       carry size", "ok       requirements covered", "dry-run  install wheels",
                 "dry-run  install package", "dry-run  collect gpu tests and bench", "ok       summary"):
        assert f"gpu_check: {line}" in out, line
    n = int(re.search(r"collect gpu tests and bench: (\d+) collected", out).group(1))
    assert n >= 20  # the gpu tests and benches, each parametrisation counted
    [res] = tmp_path.glob("*.json")
    data = json.loads(res.read_text())
    assert data["steps"]["install package"]["status"] == "dry-run"
    assert [t["status"] for t in data["tests"]] == ["passed", "passed"]  # a real read of the carried slide
    assert data["device"]["gpu"] == "dry-run (no CUDA call)"
