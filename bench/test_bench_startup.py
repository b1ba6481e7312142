"""Start-up: ``Engine()`` construction and a cached triage rerun of the bundled slide, old path vs new,
beside ``python -c "import torch"`` (the floor neither can go below).

Both are what a user waits for before any slide work: a fresh interpreter importing torch and timm,
building the nuclei model, loading the safety states and the Numba kernels (from their cache), and for
the rerun also finding the slide finished (``summary.json`` matches the run key) and rewriting the
worklist. Each number is the wall time of a fresh process, the paths interleaved, best of ``REPEATS``:

* ``old``: ``CELLVIT_OPTIMUS_EAGER_DYNAMO=1`` and ``CELLVIT_OPTIMUS_TORCHVISION=1``: timm imported with the
  real torchvision (which imports ``torch._dynamo`` through ``torchvision.ops``) and its own
  ``torch.compiler.disable`` (see ``heads/_timm_compat.py``);
* ``new``: the default, timm imported against a torchvision stand-in with that decorator deferred; the
  model built on the meta device without timm's random init (both paths share this).

``extra_info`` holds the numbers, the ratios old/new and each path's ratio to ``import torch`` (under
``--benchmark-disable``, as in CI, the new path runs once and nothing is compared). The rerun uses the
coarse nuclei resolution of the triage tests (4 um/px) so that the one uncached run that fills the
cache stays short; a cached rerun does no tile work, so its time does not depend on it. Numba's cache is
warmed by that first run (once per install, as for a user's first command).

Run: ``pytest bench/test_bench_startup.py --benchmark-only -s`` (on a quiet machine: note the load).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPEATS = int(os.environ.get("OPTIMUS_STARTUP_REPEATS", "2"))  # fresh processes per path
COARSE = ["--nuclei-mpp", "4", "--overlap", "32"]
ENGINE = ("import time; t = time.perf_counter(); "
          "from cellvit_optimus.engine.triage.engine import Engine, TriageConfig; "
          "Engine(TriageConfig(nuclei_mpp=4.0, overlap_px=32)); print(time.perf_counter() - t)")


def _env(path: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CELLVIT_OPTIMUS_EAGER_DYNAMO", None)
    env.pop("CELLVIT_OPTIMUS_TORCHVISION", None)
    if path == "old":
        env["CELLVIT_OPTIMUS_EAGER_DYNAMO"] = "1"
        env["CELLVIT_OPTIMUS_TORCHVISION"] = "1"
    return env


def _import_torch() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t


def _triage(out: Path, path: str) -> tuple[float, str]:
    t = time.perf_counter()
    cli = Path(sys.executable).parent / "cellvit-optimus"  # the console script a user runs
    res = subprocess.run([str(cli), "triage", "--out", str(out), "-q", *COARSE], capture_output=True, text=True,
                         env=_env(path), timeout=1200)
    wall = time.perf_counter() - t
    assert res.returncode == 0, res.stderr[-2000:]
    return wall, res.stdout


def _engine(path: str) -> float:
    res = subprocess.run([sys.executable, "-c", ENGINE], capture_output=True, text=True, env=_env(path),
                         timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    return float(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def finished_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("startup") / "out"
    _, stdout = _triage(out, "new")  # fills the feature cache, summary.json and Numba's cache
    assert stdout.splitlines()[0].startswith("done ")
    return out


def test_startup_engine_and_cached_rerun_old_vs_new(benchmark, finished_out):
    times: dict[str, dict[str, list[float]]] = {"old": {"engine": [], "rerun": []},
                                                "new": {"engine": [], "rerun": []}}
    torch_s: list[float] = []

    # under --benchmark-disable (CI) one pass of the new path only: it checks the bench, cheaply
    paths = ("new",) if benchmark.disabled else ("old", "new")
    repeats = 1 if benchmark.disabled else REPEATS

    def measure() -> None:
        for _ in range(repeats):
            torch_s.append(_import_torch())
            for path in paths:
                times[path]["engine"].append(_engine(path))
                wall, stdout = _triage(finished_out, path)
                assert stdout.splitlines()[0].startswith("cached "), stdout  # the rerun did no slide work
                times[path]["rerun"].append(wall)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    if benchmark.disabled:
        return
    best = {p: {k: min(v) for k, v in d.items()} for p, d in times.items()}
    benchmark.extra_info.update({
        "engine_s_old": round(best["old"]["engine"], 2), "engine_s_new": round(best["new"]["engine"], 2),
        "rerun_s_old": round(best["old"]["rerun"], 2), "rerun_s_new": round(best["new"]["rerun"], 2),
        "engine_ratio": round(best["old"]["engine"] / best["new"]["engine"], 2),
        "rerun_ratio": round(best["old"]["rerun"] / best["new"]["rerun"], 2),
        "import_torch_s": round(min(torch_s), 2),
        "engine_over_import_torch": {p: round(best[p]["engine"] / min(torch_s), 2) for p in best},
        "rerun_over_import_torch": {p: round(best[p]["rerun"] / min(torch_s), 2) for p in best},
        "all_s": {p: {k: [round(x, 2) for x in v] for k, v in d.items()} for p, d in times.items()},
        "load_avg_1min": os.getloadavg()[0],
    })
    print(f"\nstart-up (s, best of {repeats}):", benchmark.extra_info)
