"""Benchmarks share the test fixtures (real data paths, devices) and the test-only reference code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import (  # noqa: E402,F401  (re-exported fixtures)
    NUCLEI,
    SHARED,
    SLIDES,
    nuclei_dir,
    pytest_collection_modifyitems,
    shared_data,
    slides_dir,
    test_device,
)

# bench helpers (benchutil); appended, so that `conftest` above still resolves to tests/conftest.py
sys.path.append(str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def hoptimus0_cpu():  # type: ignore[no-untyped-def]
    """H-optimus-0's architecture, seeded random init, fp32 on the CPU: built once per session (a 1.1 B
    parameter init takes tens of seconds) and shared; users deep-copy it before casting or moving it."""
    from cellvit_optimus.heads import build_backbone

    return build_backbone("hoptimus0", seed=0)


def pytest_benchmark_update_machine_info(config, machine_info):  # type: ignore[no-untyped-def]
    """Save what the numbers depend on with every result: commit, CPU, GPU + driver, library versions."""
    import platform
    import subprocess

    def run(*cmd: str) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True,
                                  cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
        except Exception:
            return None

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu_model = platform.processor() or None
    info: dict[str, object] = {
        "git_commit": run("git", "rev-parse", "HEAD"),
        "git_dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    torch_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            info.update(gpu=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count(),
                        gpu_driver=run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"))
    except Exception:  # torch missing or broken: the CPU-only facts still go in
        pass
    for mod in ("numba", "numpy", "timm", "tifffile", "imagecodecs", "cucim", "nvidia.dali"):
        try:
            info[f"{mod.split('.')[-1]}_version"] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            info[f"{mod.split('.')[-1]}_version"] = None
    machine_info["optimus"] = info
