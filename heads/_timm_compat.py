"""Import timm without torchvision, for start-up and for machines where torchvision is unusable.

timm imports torchvision at ``import timm`` (``FrozenBatchNorm2d`` in its norm layers, the transforms in
``timm.data``), although the vision transformers we build never call into it. Importing torchvision
costs start-up (torchvision 0.29 imports ``torch._dynamo`` through ``torchvision.ops``: ``import timm``
1.8 s with it against 0.35 s without, quiet 2-core machine), and on CPU installs the pinned torch
(2.13.0+cpu) has no matching torchvision wheel: the CUDA torchvision wheel that pip picks instead dies at
import (``RuntimeError: operator torchvision::nms does not exist``), taking timm down with it.

:func:`import_timm` is the one way the package imports timm. When the host process imported torchvision
already (or ``CELLVIT_OPTIMUS_TORCHVISION=1`` asks for it) and it imports cleanly, timm gets the real one.
Otherwise (the default, and a torchvision that fails to import) it puts a stand-in ``torchvision`` on
``sys.meta_path`` that satisfies timm's import-time needs (names to import, classes to subclass,
attribute look-ups used as dict keys) and raises a clear :class:`ImportError` the moment anything in it
is actually called or instantiated. Optional torchvision features that timm guards with
``try/except ImportError`` (FX feature extraction) are reported as missing instead, so timm switches
them off as it would without torchvision. A host that wants timm's torchvision features in the same
process imports torchvision before the package builds its first model.

The stand-in is visible only while timm imports: afterwards ``sys.modules`` and ``sys.meta_path`` are
left as they were found, so that other code in the host process sees the same torchvision as before
(the real module, or the same import error). timm keeps its references to the stand-in's classes
(``FrozenBatchNorm2d`` for isinstance checks, transforms it subclasses); the few places where timm
imports torchvision lazily (dataset factories, a debug image dump) are never reached by this package
and meet the real torchvision's error there, as they would without this module.

Start-up: a few timm model modules we never build (NaFlexViT and those built on it) decorate methods
with ``torch.compiler.disable`` when the module is imported, and that call imports ``torch._dynamo``,
the largest part of ``import timm`` (import timm measured on the shared 2-core machine under load: 31-36 s
with it, 9 s without). While :func:`import_timm` imports timm, ``torch.compiler.disable`` is therefore
replaced by a deferring version: a decorated function gets the real ``disable`` on its first call, so
nothing changes for code that calls it, and the process never imports ``torch._dynamo`` unless something
uses it. ``CELLVIT_OPTIMUS_EAGER_DYNAMO=1`` keeps timm's own import path (the bench compares both).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import threading
import types
from typing import Any, NoReturn

__all__ = ("NOT_IMPORTED", "STUB_MESSAGE", "import_timm", "torchvision_stubbed")

logger = logging.getLogger(__name__)

#: what every use of the stand-in says
STUB_MESSAGE = (
    "torchvision is not usable in this environment (it failed to import: {cause}); cellvit-optimus "
    "replaced it with a stand-in so that timm imports, and `{name}` was called. Install a torchvision "
    "build that matches torch {torch_version} to use this feature."
)

#: the stand-in's cause when torchvision was never tried (the default; see the module docstring)
NOT_IMPORTED = ("not imported: cellvit-optimus imports timm without torchvision to start faster; import "
                "torchvision before the first model is built, or set CELLVIT_OPTIMUS_TORCHVISION=1")

# submodules that timm imports inside try/except ImportError: report them missing, as if torchvision
# were not installed, rather than handing timm stand-ins it would then try to call
_OPTIONAL_SUBMODULES = ("torchvision.models.feature_extraction",)

_lock = threading.Lock()
_stub_cause: str | None = None  # set once timm was imported against the stand-in
_checked = threading.Event()  # timm was imported through here (once per process)
_installing = False  # the finder is on sys.meta_path (only while timm imports)
_STUBS: dict[str, types.ModuleType] = {}  # stand-in modules by name, kept out of sys.modules afterwards


def torchvision_stubbed() -> bool:
    """Whether :func:`import_timm` had to import timm against the stand-in in this process."""
    return _stub_cause is not None


def import_timm() -> types.ModuleType:
    """Import and return :mod:`timm`, standing in for torchvision while it imports if the real one
    cannot import. Leaves ``sys.modules`` and ``sys.meta_path`` as found (timm itself aside).

    Thread-safe and idempotent; cheap after the first call.
    """
    if not _checked.is_set():
        with _lock:
            if not _checked.is_set():
                _import_timm_once()
                _checked.set()
    return importlib.import_module("timm")


def _is_torchvision(name: str) -> bool:
    return name == "torchvision" or name.startswith("torchvision.")


def _import_timm_once() -> None:
    global _stub_cause, _installing
    if "timm" in sys.modules:  # imported before us (by the host): nothing to stand in for
        return
    found = {n: m for n, m in sys.modules.items() if _is_torchvision(n)}
    if "torchvision" in found or os.environ.get("CELLVIT_OPTIMUS_TORCHVISION") == "1":
        try:
            import torchvision  # noqa: F401
        except Exception as exc:  # noqa: BLE001  RuntimeError from a mismatched wheel, ImportError if absent
            cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
        else:
            _import_timm_module()
            return
    else:
        # not imported by the host: timm gets the stand-in, never the real one (module docstring: start-up)
        cause = NOT_IMPORTED
    # a failed import leaves half-initialised torchvision submodules behind; drop them so that the
    # finder below is consulted for every torchvision name while timm imports
    _drop_torchvision()
    sys.meta_path.insert(0, _FINDER)
    _installing = True
    try:
        _import_timm_module()
        _stub_cause = cause
        logger.debug("timm imported against a torchvision stand-in (%s)", cause)
    finally:
        _installing = False
        sys.meta_path.remove(_FINDER)
        _drop_torchvision()
        sys.modules.update(found)  # as the host left them


def _import_timm_module() -> None:
    if os.environ.get("CELLVIT_OPTIMUS_EAGER_DYNAMO") == "1":
        importlib.import_module("timm")
    else:
        _import_timm_deferring_dynamo()


def _import_timm_deferring_dynamo() -> None:
    """import timm with ``torch.compiler.disable`` deferred to each decorated function's first call
    (module docstring: it is what pulls ``torch._dynamo`` into ``import timm``)"""
    import torch

    real = torch.compiler.disable

    def deferred_disable(fn: Any = None, recursive: bool = True, **kwargs: Any) -> Any:
        if fn is None:  # used as @disable(recursive=...)
            return lambda f: deferred_disable(f, recursive, **kwargs)
        if not isinstance(fn, types.FunctionType):  # modules, classes, callables: as timm asked
            return real(fn, recursive=recursive, **kwargs)
        wrapped: Any = None

        @functools.wraps(fn)
        def call(*args: Any, **kw: Any) -> Any:
            nonlocal wrapped
            if wrapped is None:
                wrapped = real(fn, recursive=recursive, **kwargs)
            return wrapped(*args, **kw)

        return call

    torch.compiler.disable = deferred_disable
    try:
        importlib.import_module("timm")
    finally:
        torch.compiler.disable = real


def _drop_torchvision() -> None:
    for name in [n for n in sys.modules if _is_torchvision(n)]:
        del sys.modules[name]


def _fail(name: str) -> NoReturn:
    import torch

    if _stub_cause == NOT_IMPORTED:
        raise ImportError(f"`{name}` needs torchvision, which was {NOT_IMPORTED}")
    raise ImportError(
        STUB_MESSAGE.format(cause=_stub_cause, name=name, torch_version=torch.__version__.split("+")[0])
    )


class _StubAttr:
    """An attribute of a stand-in class (e.g. ``InterpolationMode.BILINEAR``): hashable, never callable."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return f"<torchvision stand-in {self._name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        _fail(self._name)


class _StubClassMeta(type):
    """Metaclass of stand-in classes: class attributes exist (timm builds dicts of them at import)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubAttr(f"{cls.__module__}.{cls.__qualname__}.{name}")


def _stub_class(module: str, name: str) -> type:
    qualname = f"{module}.{name}"

    def __init__(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        _fail(qualname)

    # subclassable (timm derives transforms from torchvision's), isinstance() works and is always False
    return _StubClassMeta(name, (), {"__init__": __init__, "__module__": module, "__qualname__": name})


class _StubModule(types.ModuleType):
    """A torchvision (sub)module whose every public name is a stand-in that fails when used.

    CamelCase names are classes in torchvision (``Resize``, ``InterpolationMode``,
    ``FrozenBatchNorm2d``); any other name may be a submodule (``transforms``) or a function
    (``to_tensor``), so it becomes a child stand-in module that also fails when called.
    """

    __torchvision_stub__ = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        if full in _OPTIONAL_SUBMODULES:
            raise AttributeError(name)
        if name[:1].isupper():
            value: Any = _stub_class(self.__name__, name)
        else:
            value = _STUBS.get(full) or _new_stub_module(full)
        setattr(self, name, value)
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        _fail(self.__name__)


def _new_stub_module(fullname: str) -> _StubModule:
    module = _StubModule(fullname)
    module.__path__ = []  # a package: submodules resolve through the finder, never the broken wheel
    module.__spec__ = importlib.machinery.ModuleSpec(fullname, _FINDER, is_package=True)
    module.__loader__ = _FINDER
    _STUBS[fullname] = module
    if _installing:  # so that `import torchvision.x` and attribute access give the same object
        sys.modules[fullname] = module
    return module


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Meta-path finder that answers every ``torchvision`` import with a :class:`_StubModule`."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision" and not fullname.startswith("torchvision."):
            return None
        if fullname in _OPTIONAL_SUBMODULES:
            # fail the way an absent module does, which timm catches and then goes without the feature
            raise ModuleNotFoundError(f"No module named {fullname!r} (torchvision stand-in)", name=fullname)
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _STUBS.get(spec.name)
        if module is None:
            module = _StubModule(spec.name)
            module.__path__ = []
            _STUBS[spec.name] = module
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


_FINDER = _StubFinder()
