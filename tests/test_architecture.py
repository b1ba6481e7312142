"""The import rules of docs/architecture.md, checked on the source (AST), not by importing it.

1. No module uses a ``_private`` name of another module: not ``from m import _x``, not ``m._x`` on an
   imported module or class. A private *module* (``kernels/_numba.py``, ``safety/_state.py``) may be
   imported by the modules of its own package, and nowhere else.
2. The leaves (heads/, kernels/, safety/) import nothing from the engine but ``engine.errors``.
3. Inside engine/ the wings form layers: ``base`` (errors, io, geojson, jsondoc, settings, lazy, data,
   cli_params, the package itself) <- ``wsi`` <- ``pipeline`` <- ``triage`` / ``training`` <- ``cli``; a
   module imports only its own wing and the layers below (function-local imports count too), so there is
   no import loop.
4. Each wing (wsi, pipeline, triage, training) declares its public API in its ``__init__`` (``__all__``,
   every name resolving), and a module of another wing (or the CLI) imports only those names, from the
   wing's package: never one of its modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"engine": "cellvit_optimus.engine", "heads": "cellvit_optimus.heads",
           "kernels": "cellvit_optimus.kernels", "safety": "cellvit_optimus.safety"}
LEAVES = ("heads", "kernels", "safety")
#: engine wings, lowest first; a module may import from its own wing and any lower one
LAYERS = {"base": 0, "wsi": 1, "pipeline": 2, "triage": 3, "training": 3, "cli": 4}
BASE = {"errors", "io", "geojson", "jsondoc", "settings", "lazy", "data", "cli_params", ""}
WINGS = ("wsi", "pipeline", "triage", "training")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[int, str, str | None, str | None]]:
    """(line, module imported from, name imported or None, local alias) for every import in the file,
    function-local ones included; relative imports resolved"""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[:len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for alias in node.names:
                out.append((node.lineno, src, alias.name, alias.asname or alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node.lineno, alias.name, None, alias.asname or alias.name.split(".")[0]))
    return out


def _package(module: str) -> str:
    """the package a module belongs to (a package's ``__init__`` belongs to itself)"""
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(name: str, path: Path) -> list[str]:
    found = []
    bound: dict[str, str] = {}  # local name -> the module it came from (or the module itself)
    own_package = _package(name) if name in MODULES else name.rsplit(".", 1)[0]
    for line, src, imported, local in _imports(name, path):
        if not src.startswith("cellvit_optimus"):
            continue
        target = f"{src}.{imported}" if imported and f"{src}.{imported}" in MODULES else src
        if imported and target == src and _is_private(imported) and src != name:
            found.append(f"{_shown(path)}:{line}: from {src} import {imported}")
        private_module = next((p for p in target.split(".")[1:] if _is_private(p)), None)
        if private_module and target in MODULES and _package(target) != own_package:
            found.append(f"{_shown(path)}:{line}: imports the private module {target}")
        if local:
            bound[local] = target
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and _is_private(node.attr) and bound[node.value.id] != name):
            found.append(f"{_shown(path)}:{node.lineno}: {node.value.id}.{node.attr} "
                         f"(from {bound[node.value.id]})")
    return found


def test_the_walk_sees_the_whole_package():
    assert len(MODULES) > 50
    assert "cellvit_optimus.engine.triage.engine" in MODULES and "cellvit_optimus.kernels._numba" in MODULES


def test_the_checker_catches_what_it_is_for(tmp_path):
    """the rule must be able to fail: a module written with each forbidden use is reported"""
    bad = tmp_path / "bad.py"
    bad.write_text("from cellvit_optimus.engine.io import _private\n"
                   "from cellvit_optimus.engine.triage import engine\n"
                   "from cellvit_optimus.kernels import _numba\n"
                   "x = engine._forward\n")
    found = _private_uses("cellvit_optimus.engine.somewhere", bad)
    assert len(found) == 3, found


def test_no_module_uses_a_private_name_of_another_module():
    found = [f for name, path in MODULES.items() for f in _private_uses(name, path)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_only_the_error_types_from_the_engine(leaf):
    found = [f"{path.relative_to(REPO)}:{line}: {src}"
             for name, path in MODULES.items() if name.startswith(FOLDERS[leaf])
             for line, src, imported, _ in _imports(name, path)
             if src.startswith("cellvit_optimus.engine") and src != "cellvit_optimus.engine.errors"]
    assert not found, "\n".join(found)


def _wing(module: str) -> str:
    parts = module.split(".")[2:]  # after cellvit_optimus.engine
    if not parts or parts[0] in BASE:
        return "base"
    if parts[0] in ("wsi", "pipeline", "triage", "training"):
        return parts[0]
    if parts[0] in ("cli", "doctor"):  # the command line and its environment check
        return "cli"
    raise AssertionError(f"{module}: not in any wing of docs/architecture.md")


def _engine_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        if not name.startswith("cellvit_optimus.engine"):
            continue
        deps = set()
        for _, src, imported, _ in _imports(name, path):
            target = f"{src}.{imported}" if imported and f"{src}.{imported}" in MODULES else src
            if target in MODULES and target.startswith("cellvit_optimus.engine") and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def test_engine_wings_import_only_their_own_wing_and_lower_layers():
    found = []
    for name, deps in _engine_graph().items():
        for dep in deps:
            a, b = _wing(name), _wing(dep)
            if a != b and LAYERS[b] >= LAYERS[a]:
                found.append(f"{name} ({a}) imports {dep} ({b})")
    assert not found, "\n".join(sorted(found))


def test_no_import_loop_inside_the_engine():
    graph = _engine_graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    loops = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                path = stack + [node]
                loops.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not loops, "\n".join(loops)


def test_one_atomic_writer():
    """only engine/io.py creates temporaries and renames them over outputs (AtomicFile); everything
    else writes through it, the leaves included (they serialise, the engine writes)"""
    found = []
    for name, path in MODULES.items():
        if name == "cellvit_optimus.engine.io":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and (node.attr in ("replace", "rename") and isinstance(
                    node.value, ast.Name) and node.value.id == "os" or node.attr in (
                    "mkstemp", "NamedTemporaryFile") and isinstance(node.value, ast.Name)):
                found.append(f"{_shown(path)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def _declared(wing: str) -> tuple[str, ...]:
    """the ``__all__`` a wing's ``__init__`` declares (a literal tuple, read from the source)"""
    tree = ast.parse((REPO / "engine" / wing / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return tuple(ast.literal_eval(node.value))
    return ()


def _wing_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 2 and parts[:2] == ["cellvit_optimus", "engine"] and parts[2] in WINGS:
        return parts[2]
    return None


def _cross_wing_uses(name: str, path: Path, declared: dict[str, tuple[str, ...]]) -> list[str]:
    """imports by ``name`` (at ``path``) of another wing's modules, or of names its ``__init__`` does not
    declare"""
    own = _wing(name)
    found = []
    for line, src, imported, _ in _imports(name, path):
        wing = _wing_of(src)
        if wing is None or wing == own:
            continue
        package = f"cellvit_optimus.engine.{wing}"
        if src != package:
            found.append(f"{_shown(path)}:{line}: imports {src} (a module of the {wing} wing; "
                         f"import from {package})")
        elif imported is not None and imported not in declared[wing]:
            found.append(f"{_shown(path)}:{line}: {imported} is not in {package}.__all__")
    return found


@pytest.mark.parametrize("wing", WINGS)
def test_each_wing_declares_its_public_api(wing):
    import importlib

    declared = _declared(wing)
    assert declared, f"engine/{wing}/__init__.py declares no __all__"
    assert len(set(declared)) == len(declared)
    package = importlib.import_module(f"cellvit_optimus.engine.{wing}")
    missing = [n for n in declared if not hasattr(package, n)]
    assert not missing, f"{wing}: declared but not importable: {missing}"
    # a declared name that is also a submodule's name is replaced by that module once anything imports it
    # (`training.train` was the CLI group and train.py: `cellvit-optimus train` broke after test_train.py)
    submodules = {p.stem for p in (REPO / "engine" / wing).glob("*.py")}
    assert not set(declared) & submodules, f"{wing}: exports named like its modules: {set(declared) & submodules}"


def test_no_wing_imports_another_wings_modules():
    declared = {w: _declared(w) for w in WINGS}
    found = [f for name, path in MODULES.items() if name.startswith("cellvit_optimus.engine")
             for f in _cross_wing_uses(name, path, declared)]
    assert not found, "\n".join(found)


def test_the_public_api_checker_catches_what_it_is_for(tmp_path):
    """the rule must be able to fail: a module path of another wing and an undeclared name are reported"""
    bad = tmp_path / "bad.py"
    bad.write_text("from cellvit_optimus.engine.wsi.slide import open_slide\n"
                   "from cellvit_optimus.engine.pipeline import _Pipeline\n"
                   "from cellvit_optimus.engine.pipeline import run_pipeline\n"
                   "from cellvit_optimus.engine.triage.outputs import write_worklist\n")
    declared = {w: _declared(w) for w in WINGS}
    found = _cross_wing_uses("cellvit_optimus.engine.triage.somewhere", bad, declared)
    assert len(found) == 2, found  # the wsi module path and the undeclared name; triage's own module is fine


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_nothing_from_the_engine_wings(leaf):
    """the leaves (heads/, kernels/, safety/) sit below every wing: not even a function-local import of one"""
    found = [f"{path.relative_to(REPO)}:{line}: {src}"
             for name, path in MODULES.items() if name.startswith(FOLDERS[leaf])
             for line, src, imported, _ in _imports(name, path)
             if _wing_of(src) is not None or (src == "cellvit_optimus.engine" and imported in WINGS)]
    assert not found, "\n".join(found)
