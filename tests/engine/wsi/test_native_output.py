"""cuCIM's cuFile start-up lines are kept from library users too, not only from the CLI.

With CUDA 13 libraries installed but no GPU driver, ``import cucim`` and cuCIM's first open each print
"dlopen error libcuda.so.1 ... cuFile initialization failed" from C. The CLI filters its whole run; a
Python service that calls ``open_slide`` got them on its own stderr.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from cellvit_optimus.engine.wsi import NATIVE_NOISE


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, timeout=300)


def test_quiet_native_output_drops_the_noise_and_passes_everything_else_through():
    """C ``printf`` (buffered in C's stdio), raw writes to both descriptors and Python's own streams"""
    r = _run("""
        import ctypes, os, sys
        from cellvit_optimus.engine.wsi import quiet_native_output

        libc = ctypes.CDLL(None)
        print("before", flush=True)
        with quiet_native_output():
            libc.printf(b"dlopen error libcuda.so.1: cannot open shared object file\\n")
            libc.printf(b"a C line the user should see\\n")
            os.write(2, b" cuFile initialization failed\\n")
            os.write(2, b"a native warning on stderr\\n")
            os.write(1, b" missing cuda symbols while dynamic loading\\n")
        print("after", flush=True)
        libc.fflush(None)
    """)
    assert r.returncode == 0, r.stderr
    assert not NATIVE_NOISE.search(r.stdout + r.stderr), (r.stdout, r.stderr)
    assert r.stdout.splitlines() == [b"before", b"a C line the user should see", b"after"]
    assert r.stderr.splitlines() == [b"a native warning on stderr"]


def test_opening_slides_with_cucim_prints_no_cufile_lines(slides_dir):
    pytest.importorskip("cucim")
    slide = slides_dir / "cmu-1-small-region.svs"
    # torch first: its CUDA libraries are what make cuCIM try cuFile on a machine without a GPU driver
    ours = _run(f"""
        import sys
        try:
            import torch
        except ImportError:
            pass
        from cellvit_optimus.engine.wsi import open_slide
        for _ in range(2):
            with open_slide({str(slide)!r}) as s:
                assert s.backend == "cucim", s.backend
                s.read_region((0, 0), 0, (8, 8))
        sys.stderr.write("done\\n")
    """)
    assert ours.returncode == 0, ours.stderr
    assert ours.stderr.splitlines() == [b"done"] and ours.stdout == b""
    # the same opens with cuCIM called directly, for the record (they print on machines like the CI's)
    direct = _run(f"""
        try:
            import torch
        except ImportError:
            pass
        from cucim import CuImage
        CuImage({str(slide)!r})
    """)
    print("cuCIM called directly printed:", direct.stdout + direct.stderr)
