#!/usr/bin/env bash
# The prepared first run on a lent GPU machine (bare, Python 3.12 with its own torch and CUDA 13, no
# network): install this package from carried wheels, run the gpu-marked tests, then a trimmed bench,
# write bench/results/<gpu>-<date>.json (and a copy under $OUT) and print one line per check.
#
#   bash bench/gpu_check.sh --prepare   # here, with the package index: build .gpu_carry/ (ignored)
#   bash bench/gpu_check.sh --dry-run   # here or in CI: every step that needs no CUDA
#   bash bench/gpu_check.sh             # on the GPU machine (bench/README.md gives the `run` call)
#
# Time slots (the device tool allows 10 min a call): install < 1 min, tests < 3 min, bench < 5 min.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=run
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry-run ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--prepare | --dry-run]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
CARRY=.gpu_carry
WHEELS=$CARRY/wheels
TEST_SLOT_S=${GPU_CHECK_TEST_S:-170}
BENCH_SLOT_S=${GPU_CHECK_BENCH_S:-290}
# the files that hold the gpu-marked tests, and the GPU benches, most wanted first
GPU_TESTS=(tests/engine/pipeline/test_runner.py tests/engine/wsi/test_gpu_decode.py)
GPU_BENCH=(bench/test_bench_e2e_gpu.py bench/test_bench_backbone.py bench/test_bench_gpu_decode.py
           bench/test_bench_backbone_bf16.py)
# the slide every GPU test and bench reads; the package ships the same file
SLIDE=cmu-1-small-region.svs
BUNDLED=engine/data/cmu_small_region.svs
# pip download flags for the GPU machine's interpreter (CPython 3.12, glibc >= 2.28, x86-64)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
steps=()
say() { printf 'gpu_check: %-8s %s: %s\n' "$2" "$1" "${3:-}"; }

prepare() {
  # shared data next to the repo, as the tests' default (tests/conftest.py)
  local shared=${OPTIMUS_SHARED_DATA:-../shared/data}
  mkdir -p "$WHEELS"
  # ("!name" lines mark what is knowingly not carried: not for pip)
  if ! "$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$WHEELS" \
      -r <(grep -v '^[[:space:]]*!' bench/gpu_wheels.txt); then
    say "prepare: wheels" FAILED "pip download failed"; return 1
  fi
  # one version of each package only: two stop the install on the machine
  "$PY" - "$WHEELS" <<'EOF' || return 1
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from gpu_check import _listed, _wheel_name_version
wanted = _listed(Path("bench/gpu_wheels.txt"))
for w in Path(sys.argv[1]).glob("*.whl"):
    name, version = _wheel_name_version(w)
    if wanted.get(name) not in (None, version):
        w.unlink()
        print(f"gpu_check: prepare: dropped {w.name} (not the listed version)")
EOF
  # the slide travels only if it is not the bundled copy
  if [ -f "$shared/slides/$SLIDE" ] && ! cmp -s "$shared/slides/$SLIDE" "$BUNDLED"; then
    mkdir -p "$CARRY/data/slides" && cp "$shared/slides/$SLIDE" "$CARRY/data/slides/"
  fi
  say "prepare: wheels" ok "$(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$CARRY" | cut -f1) in $CARRY"
}

data_dir() {  # the tests' data folder: the carried one, completed with the bundled slide
  local d=$1
  mkdir -p "$d/slides"
  if [ -d "$CARRY/data/slides" ]; then cp -n "$CARRY"/data/slides/* "$d/slides/" 2>/dev/null; fi
  [ -f "$d/slides/$SLIDE" ] || cp "$BUNDLED" "$d/slides/$SLIDE"
}

if [ "$MODE" = prepare ]; then
  prepare; exit $?
fi

RUN_DIR=$(mktemp -d /tmp/gpu_check.XXXXXX)
[ "$MODE" = dry-run ] && trap 'rm -rf "$RUN_DIR"' EXIT
export OPTIMUS_SHARED_DATA=$RUN_DIR/data
data_dir "$OPTIMUS_SHARED_DATA"
status=0

# -- 1. what travels ------------------------------------------------------------------------------------------
if [ "$MODE" = dry-run ]; then
  export GPU_CHECK_DRY_RUN=1
  prepare || status=1  # (pip download skips the wheels already there)
  "$PY" bench/gpu_check.py carry-size . "$CARRY" || status=1
  "$PY" bench/gpu_check.py requirements "$WHEELS" || status=1
  # the carried wheels install on CPython 3.12 (resolved for that interpreter, nothing fetched)
  # (Requires-Python is checked against 3.12 by gpu_check.py requirements: pip would use this interpreter's)
  if "$PY" -m pip install -q --dry-run --no-index --no-deps --ignore-requires-python "${PLATFORM[@]}" \
      --target "$RUN_DIR/site" "$WHEELS"/*.whl >"$RUN_DIR/pip-wheels.log" 2>&1; then
    steps+=("install wheels=dry-run:$(ls "$WHEELS"/*.whl | wc -l) wheels resolve for cp312 manylinux_2_28")
  else
    steps+=("install wheels=FAILED:$(grep -m1 ERROR "$RUN_DIR/pip-wheels.log")"); status=1
  fi
else
  # -- on the GPU machine: wheels, then the package, no index, no build isolation -----------------------------
  t0=$(date +%s)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl \
      >"$RUN_DIR/pip-wheels.log" 2>&1; then
    steps+=("install wheels=ok:$(ls "$WHEELS"/*.whl | wc -l) wheels in $(( $(date +%s) - t0 )) s")
  else
    steps+=("install wheels=FAILED:$(grep -m1 -i error "$RUN_DIR/pip-wheels.log")"); status=1
  fi
fi

# the package itself: editable, no dependencies, the interpreter's own setuptools
DRY=(); [ "$MODE" = dry-run ] && DRY=(--dry-run)
if "$PY" -m pip install -q "${DRY[@]}" --no-index --no-deps --no-build-isolation -e . >"$RUN_DIR/pip-pkg.log" 2>&1; then
  steps+=("install package=$([ "$MODE" = dry-run ] && echo dry-run || echo ok):pip install -e . --no-deps --no-build-isolation")
elif [ "$MODE" = run ]; then
  # no usable setuptools there: map the folders into the namespace by hand (what package-dir does)
  SITE=$RUN_DIR/site-src
  mkdir -p "$SITE/cellvit_optimus"
  for pkg in engine heads kernels safety; do ln -s "$PWD/$pkg" "$SITE/cellvit_optimus/$pkg"; done
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  steps+=("install package=ok:editable install failed ($(grep -m1 -i error "$RUN_DIR/pip-pkg.log")); folders linked on PYTHONPATH")
else
  steps+=("install package=FAILED:$(grep -m1 -i error "$RUN_DIR/pip-pkg.log")"); status=1
fi

if [ "$MODE" = run ]; then
  "$PY" bench/gpu_check.py torch-range || status=1
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    && steps+=("cuda available=ok:$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "cuda", torch.version.cuda)')") \
    || { steps+=("cuda available=FAILED:torch.cuda.is_available() is False"); status=1; }
fi

# -- 2. gpu-marked tests ------------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEs --benchmark-disable -o console_output_style=classic)
if [ "$MODE" = dry-run ]; then
  # collection of every gpu test and bench with the carried data, and a real read of that data
  if "${PYTEST[@]}" --collect-only -m gpu "${GPU_TESTS[@]}" "${GPU_BENCH[@]}" >"$RUN_DIR/collect.log" 2>&1; then
    n=$(grep -cE '::' "$RUN_DIR/collect.log")
    steps+=("collect gpu tests and bench=dry-run:$n collected with OPTIMUS_SHARED_DATA=$OPTIMUS_SHARED_DATA")
  else
    steps+=("collect gpu tests and bench=FAILED:$(grep -m1 -E 'Error|error' "$RUN_DIR/collect.log")"); status=1
  fi
  "${PYTEST[@]}" tests/engine/wsi/test_gpu_decode.py -k "spliced_streams_decode" \
    --junitxml="$RUN_DIR/tests.xml" >"$RUN_DIR/tests.log" 2>&1 || status=1
  steps+=("bench=dry-run:not run (needs CUDA); OPTIMUS_BENCH_GPU_BATCHES=64,256")
  BENCH_ARG=()
else
  timeout -s INT "$TEST_SLOT_S" "${PYTEST[@]}" -m gpu "${GPU_TESTS[@]}" --junitxml="$RUN_DIR/tests.xml" \
    2>&1 | tee "$RUN_DIR/tests.log" | grep -E "passed|failed|error" | tail -3
  # -- 3. trimmed bench: two batch sizes, one CPU init of H-optimus-0 shared by all (bench/conftest.py) -----
  OPTIMUS_BENCH_GPU_BATCHES=${OPTIMUS_BENCH_GPU_BATCHES:-64,256} timeout -s INT "$BENCH_SLOT_S" \
    "$PY" -m pytest -p no:cacheprovider -q -m gpu --benchmark-only --benchmark-json="$RUN_DIR/bench.json" \
    "${GPU_BENCH[@]}" --junitxml="$RUN_DIR/bench.xml" 2>&1 | tee "$RUN_DIR/bench.log" | grep -E "passed|failed|error" | tail -3
  BENCH_ARG=(--bench "$RUN_DIR/bench.json" --junit "$RUN_DIR/bench.xml")
fi

# -- 4. results --------------------------------------------------------------------------------------------------
STEP_ARGS=(); for s in "${steps[@]}"; do STEP_ARGS+=(--step "$s"); done
# a dry run's results are not a GPU's: never in bench/results (GPU_CHECK_RESULTS_DIR keeps them, for tests)
if [ "$MODE" = dry-run ]; then REPORT_DEST=(--out-dir "${GPU_CHECK_RESULTS_DIR:-$RUN_DIR/results}"); else REPORT_DEST=(); fi
"$PY" bench/gpu_check.py report "${REPORT_DEST[@]}" --junit "$RUN_DIR/tests.xml" "${BENCH_ARG[@]}" \
  "${STEP_ARGS[@]}" | tee "$RUN_DIR/report.log" || status=1
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then  # what the device tool brings back
  cp "$(sed -n 's/^results_file=//p' "$RUN_DIR/report.log")" "$RUN_DIR"/*.log "$OUT"/ 2>/dev/null
fi
echo "gpu_check: exit $status ($MODE)"
exit "$status"
