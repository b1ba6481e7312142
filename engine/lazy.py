"""Lazy public names for the engine's packages (PEP 562): a wing's ``__init__`` lists its public API,
name by name with the module that defines it, and a name's module is imported on first use, so
``import cellvit_optimus.engine.wsi`` stays cheap (no torch, cuCIM or numba until a feature needs it).

Names are looked up afresh on every access (not cached in the package), so a test that patches a
module's attribute is seen through the package too."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ("exports",)


def exports(package: str,
            names: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``names`` map to the relative module
    that defines each (``{"open_slide": ".slide"}``)"""

    def __getattr__(name: str) -> object:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
