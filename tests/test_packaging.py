"""The package's shape: one import namespace, no top-level kernels/safety, cheap imports, __all__."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PACKAGES = ("cellvit_optimus.engine", "cellvit_optimus.kernels", "cellvit_optimus.heads",
            "cellvit_optimus.safety")


@pytest.mark.parametrize("name", ["kernels", "safety", "heads", "engine"])
def test_card_folders_are_not_top_level_modules(tmp_path, name):
    # run from a neutral folder: the repository root must not leak onto sys.path through the install
    r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
    if r.returncode == 0:
        # an unrelated PyPI package of that name may be installed; it must not be our folder
        r2 = subprocess.run([sys.executable, "-c", f"import {name}; print({name}.__file__)"], cwd=tmp_path,
                            capture_output=True, text=True)
        assert "cellvit" not in r2.stdout.lower() and f"/{name}/__init__.py" not in r2.stdout.replace(
            "site-packages", "")
    else:
        assert "ModuleNotFoundError" in r.stderr


def test_engine_import_is_cheap(tmp_path):
    code = ("import sys, cellvit_optimus.engine, cellvit_optimus.kernels, cellvit_optimus.heads, "
            "cellvit_optimus.safety; heavy = [m for m in ('torch', 'cucim', 'numba', 'timm', 'nvidia.dali') "
            "if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def _public_modules():
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        yield pkg_name
        # every level: the engine's wings (wsi, pipeline, triage, training) and the modules in them
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                yield info.name


@pytest.mark.parametrize("module", sorted(set(_public_modules())))
def test_public_modules_declare_all(module):
    if module.endswith(".cli"):
        pytest.importorskip("click")
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    assert isinstance(names, tuple), f"{module}.__all__ must be a tuple"
    for n in names:
        assert hasattr(mod, n), f"{module}.__all__ names {n!r}, which does not exist"


def test_dependencies_install_beside_what_users_run() -> None:
    """torch is a range holding the versions tested (2.11 on the GPU image, 2.13.0 CPU, 2.14.1), the gpu
    extra is on one CUDA major (13), and no unused hard dependency is declared"""
    import tomllib

    from packaging.requirements import Requirement

    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    torch_spec = reqs["torch"].specifier
    assert not any(s.operator == "==" for s in torch_spec), torch_spec
    for v in ("2.11.0", "2.13.0", "2.14.1"):
        assert torch_spec.contains(v), (v, torch_spec)
    assert "wsidicom" not in reqs and "pydicom" in reqs  # the DICOM reader uses pydicom directly
    gpu = [Requirement(r).name for r in project["optional-dependencies"]["gpu"]]
    assert sorted(gpu) == ["cucim-cu13", "cupy-cuda13x", "nvidia-dali-cuda130"]


def test_ci_runs_the_readme_test_command() -> None:
    import re

    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    [test_cmd] = [b for b in blocks if "pytest -n 2 --dist loadfile tests bench" in b]
    steps = [s.strip() for s in test_cmd.split("&&")][2:]  # after venv creation and activation
    ci = re.sub(r"\s*\\\n\s*", " ", (REPO / ".ci" / "run").read_text())
    ci_steps = [s.strip().replace(" -q", "") for s in re.search(r"\n(pip install -q .*?) \|\| status", ci).group(1).split("&&")]
    assert ci_steps == steps, (ci_steps, steps)
