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
    """H-optimus-0's architecture, random init, fp32 on the CPU: built once per session and shared;
    users deep-copy it before casting or moving it.

    On a CUDA machine timm initialises it on the GPU and it is moved back (a few seconds; the seeded CPU
    init takes ~90 s, which the GPU check cannot spare once per pytest step): the numbers differ from
    the CPU init's, the distributions do not, and only speed and fp16/bf16-vs-fp32 agreement are
    measured with it. Without CUDA: the seeded CPU init (``build_backbone("hoptimus0", seed=0)``)."""
    import torch
    from cellvit_optimus.heads import build_backbone

    if not torch.cuda.is_available():
        return build_backbone("hoptimus0", seed=0)
    return hoptimus0_gpu_init()


def hoptimus0_gpu_init(preset: str = "hoptimus0", device: str = "cuda"):  # type: ignore[no-untyped-def]
    """a preset's backbone, random init made on ``device`` (seeded), returned fp32 on the CPU"""
    import torch
    from cellvit_optimus.heads import PRESETS, Backbone
    from cellvit_optimus.heads._timm_compat import import_timm

    p = PRESETS[preset]
    gpus = [torch.cuda.current_device()] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(0)
        with torch.device(device):
            model = import_timm().create_model(p.timm_name, pretrained=False, **p.timm_kwargs)
    model = model.eval().requires_grad_(False).cpu()
    if gpus:
        torch.cuda.empty_cache()
    return Backbone(model, p).eval()


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
