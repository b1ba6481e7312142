"""import_timm: stands in for torchvision unless the host imported it (or asks for it), and for a broken one.

Each case runs in a fresh interpreter, since timm is imported once per process. A broken or a working
torchvision is simulated with a meta-path finder / a module planted before import_timm runs, so both
branches are tested whatever torchvision this machine has.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# makes `import torchvision` fail the way the CUDA wheel does on a CPU torch; the package is asked to try
# the real torchvision (by default it never does: test_default_never_imports_torchvision)
BREAK_TORCHVISION = """
import importlib.abc, os, sys
os.environ["CELLVIT_OPTIMUS_TORCHVISION"] = "1"
class _Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
sys.meta_path.insert(0, _Broken())
"""


def _run(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_broken_torchvision_is_stubbed_and_timm_builds_a_vit() -> None:
    _run(
        BREAK_TORCHVISION
        + """
import torch
from cellvit_optimus.heads._timm_compat import import_timm, torchvision_stubbed
before = set(sys.modules), list(sys.meta_path)
timm = import_timm()
assert torchvision_stubbed()
# the stand-in is gone once timm is in: nothing torchvision-named is left behind for other code
assert not [n for n in sys.modules if n.split(".")[0] == "torchvision"]
assert list(sys.meta_path) == before[1]
assert import_timm() is timm  # idempotent
m = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=1, num_classes=0)
with torch.no_grad():
    assert m(torch.zeros(1, 3, 56, 56)).shape == (1, 384)
"""
    )


def test_stub_raises_clear_import_error_when_used() -> None:
    _run(
        BREAK_TORCHVISION
        + """
import pytest
from cellvit_optimus.heads._timm_compat import import_timm
timm = import_timm()
# what timm holds of the stand-in (it is no longer importable: see the next test)
from timm.layers.norm_act import FrozenBatchNorm2d
import timm.data.transforms
T = timm.data.transforms.transforms
assert not isinstance(object(), FrozenBatchNorm2d)   # isinstance checks in timm keep working
for use in (lambda: FrozenBatchNorm2d(3), lambda: T.Resize(224), lambda: T.functional.to_tensor(None),
            lambda: T.InterpolationMode.BILINEAR(), lambda: timm.data.create_transform(224)):
    with pytest.raises(ImportError, match="torchvision is not usable.*was called.*matches torch"):
        use()
# features timm guards with try/except ImportError are reported missing, as without torchvision
from timm.layers import _fx
assert not _fx.has_fx_feature_extraction
"""
    )


def test_torchvision_imports_as_before_once_timm_is_in() -> None:
    """a host that imports torchvision after us gets what it got before: here the same error"""
    _run(
        BREAK_TORCHVISION
        + """
import pytest
def outcome():
    try:
        import torchvision
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "module", torchvision.__name__
first = outcome()
assert first == ("RuntimeError", "operator torchvision::nms does not exist"), first
from cellvit_optimus.heads._timm_compat import import_timm, torchvision_stubbed
import_timm()
assert torchvision_stubbed() and outcome() == first
"""
    )


def test_after_engine_torchvision_behaves_as_in_a_fresh_process() -> None:
    """whatever torchvision this environment has (absent, broken or real), the package leaves it so"""
    probe = """
def outcome():
    try:
        import torchvision
    except Exception as exc:
        return [type(exc).__name__, str(exc).splitlines()[0]]
    return ["module", torchvision.__version__, type(torchvision.ops.nms).__name__]
"""
    fresh = _run(probe + "print(outcome())").stdout.strip().splitlines()[-1]
    # Engine() builds the bundled model's backbone through timm
    make = "from cellvit_optimus.engine import Engine, TriageConfig\nEngine(TriageConfig(), device='cpu')\n"
    # start-up: building the bundled model imports neither torchvision nor torch._dynamo (its meta-device
    # build skips timm's random init, whose reference ops import dynamo)
    heavy = "import sys\nprint(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))\n"
    lines = _run(probe + make + heavy + "print(outcome())", timeout=900).stdout.strip().splitlines()
    assert lines[-2] == "[]", lines
    assert lines[-1] == fresh, (fresh, lines[-1])


def test_working_torchvision_is_left_alone() -> None:
    _run(
        """
import sys, types
fake = types.ModuleType("torchvision")  # stands for a torchvision that imports fine
sys.modules["torchvision"] = fake
from cellvit_optimus.heads._timm_compat import import_timm, torchvision_stubbed
try:
    import_timm()  # timm then imports the planted module's submodules, which do not exist
except ImportError:
    pass
assert not torchvision_stubbed()
assert sys.modules["torchvision"] is fake
assert not any(type(f).__name__ == "_StubFinder" for f in sys.meta_path)
"""
    )


def test_default_never_imports_torchvision() -> None:
    """start-up: the default imports timm against the stand-in, without torchvision nor torch._dynamo, and
    a ViT still builds; a torchvision feature says how to get the real one"""
    _run(
        """
import os, sys
os.environ.pop("CELLVIT_OPTIMUS_TORCHVISION", None)
import pytest, torch
from cellvit_optimus.heads._timm_compat import import_timm, torchvision_stubbed
timm = import_timm()
assert torchvision_stubbed()
assert "torchvision" not in sys.modules and "torch._dynamo" not in sys.modules
m = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=1, num_classes=0)
with torch.no_grad():
    assert m(torch.zeros(1, 3, 56, 56)).shape == (1, 384)
with pytest.raises(ImportError, match="needs torchvision.*import torchvision before.*OPTIMUS_TORCHVISION=1"):
    timm.data.create_transform(224)
"""
    )


def test_real_environment_imports_timm() -> None:
    from cellvit_optimus.heads import import_timm

    timm = import_timm()
    assert hasattr(timm, "create_model")


def test_timm_imports_without_torch_dynamo_and_disable_still_applies() -> None:
    _run(
        """
        import subprocess
        import sys
        # torchvision 0.29 imports torch._dynamo itself: then only our own part can be checked
        probe = chr(10).join(["import sys", "try:", "    import torchvision", "except Exception:", "    pass",
                              "print('torch._dynamo' in sys.modules)"])
        tv_pulls = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        assert tv_pulls in ("True", "False")
        import torch
        real = torch.compiler.disable
        from cellvit_optimus.heads import import_timm
        timm = import_timm()
        # the deferred decorator kept torch._dynamo out of import timm (unless torchvision brings it)
        assert "torch._dynamo" not in sys.modules or tv_pulls == "True"
        assert torch.compiler.disable is real  # restored for everyone else
        from timm.layers.typing import disable_compiler

        @disable_compiler
        def add(a, b):
            return a + b

        assert add(2, 3) == 5 and add.__name__ == "add"
        assert "torch._dynamo" in sys.modules  # the first call applied the real torch.compiler.disable
        # a ViT builds and runs without dynamo in the import path
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
        assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 192)
        """
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
