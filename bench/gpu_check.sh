#!/usr/bin/env bash
# The prepared first run on a lent GPU machine (bare, Python 3.12 with its own torch and CUDA 13, no
# network): install this package from carried wheels, then measure, most valuable first, writing each
# step's log and JSON into $OUT the moment the step ends, so a run cut short still brings back every
# finished step. The aggregated results file ($OUT/<gpu>-<date>.json, commit it under bench/results/)
# is rewritten after every step.
#
#   bash bench/gpu_check.sh --prepare   # here, with the package index: build .gpu_carry/ (ignored)
#   bash bench/gpu_check.sh --dry-run   # here or in CI: the timeline, the carry size, every step that
#                                       # needs no CUDA (tests/test_gpu_check.py runs it)
#   bash bench/gpu_check.sh --simulate  # here: the device run's machinery with stand-in steps (CPU,
#                                       # seconds; tests/test_gpu_check.py kills it midway)
#   bash bench/gpu_check.sh             # on the GPU machine (bench/README.md gives the `run` call)
#
# Every step runs under `timeout -k`, its limit cut to what is left before the run's deadline.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=run
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry-run ;;
  --simulate) MODE=simulate ;;
  --step) MODE=step ;;  # internal: one step's body, run by this script under timeout
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--prepare | --dry-run | --simulate]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
CARRY=.gpu_carry
WHEELS=$CARRY/wheels
# the device run, most valuable first: name, planned seconds, limit seconds (timeout -k), what it measures
PLAN=(
  "install      20  60  carried wheels and the package, no index"
  "environment  10  30  torch in the declared range, CUDA, device and driver"
  "backbone     75 120  H-optimus-0 FP16 and BF16: tiles/s, % of peak, graphs vs eager, timm eager"
  "e2e          70 120  end to end vs backbone only: slide reader and nvJPEG, stage timings"
  "residual     50  90  FP32 vs FP16/BF16 residual: accuracy vs FP32 on real tiles, tiles/s"
  "gpu-tests    45  90  the gpu-marked tests: runner graphs and memory, GPU decode pixels"
  "budget       35  60  the 12 GiB fit: what the card holds with every graph captured"
  "decode       20  45  read tiles/s: nvJPEG (DALI, cuCIM where installed) vs the host path"
  "report        5  20  the results file"
)
#: the whole run's planned seconds may not exceed this (the device gives 10 min a call; keep slack)
PLAN_MAX_S=360
#: no step may run past this many seconds after the start (the `run` call's timeout_s is 590)
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-540}
KILL_AFTER_S=5
# the batch sizes of the backbone benches (two: one small, one at the memory-bound end)
BATCHES=${OPTIMUS_BENCH_GPU_BATCHES:-64,256}
# the files that hold the gpu-marked tests, and the GPU benches (collected by --dry-run)
GPU_TESTS=(tests/engine/pipeline/test_runner.py tests/engine/wsi/test_gpu_decode.py)
GPU_BENCH=(bench/test_bench_backbone.py bench/test_bench_backbone_bf16.py bench/test_bench_e2e_gpu.py
           bench/test_bench_residual.py bench/test_bench_gpu_decode.py)
# the slide every GPU test and bench reads; the package ships the same file
SLIDE=cmu-1-small-region.svs
BUNDLED=engine/data/cmu_small_region.svs
# pip download flags for the GPU machine's interpreter (CPython 3.12, glibc >= 2.28, x86-64)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEs -o console_output_style=classic)
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

# -- one step's body (run as `bash bench/gpu_check.sh --step NAME PREFIX` under timeout) -----------------
# PREFIX is $OUT/NN-name: a step writes PREFIX.xml (JUnit) and PREFIX.bench.json (pytest-benchmark) there;
# its log is PREFIX.log (the caller redirects). RUN_DIR, OUT and the data folder come from the caller.
bench_step() {  # PREFIX, then pytest arguments
  local prefix=$1; shift
  if [ -n "${GPU_CHECK_COLLECT_ONLY:-}" ]; then  # the dry run: what this step would run
    OPTIMUS_BENCH_GPU_BATCHES=$BATCHES "${PYTEST[@]}" -m gpu --benchmark-disable --collect-only "$@"
    return
  fi
  OPTIMUS_BENCH_GPU_BATCHES=$BATCHES "${PYTEST[@]}" -m gpu --benchmark-only \
    --benchmark-json="$prefix.bench.json" --junitxml="$prefix.xml" "$@"
}

run_step_body() {
  local name=$1 prefix=$2
  if [ "$MODE_OF_RUN" = simulate ] && [ "$name" != report ]; then  # stand-ins: same files, no CUDA
    local seconds
    seconds=$(awk -v p="$(planned_of "$name")" -v s="${GPU_CHECK_SIMULATE_SCALE:-0.01}" 'BEGIN{print p*s}')
    exec "$PY" bench/gpu_check.py simulate-step --name "$name" --prefix "$prefix" --seconds "$seconds"
  fi
  case $name in
    install)
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl || return 1
      if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
        # no usable setuptools there: map the folders into the namespace by hand (what package-dir does)
        local site=$RUN_DIR/site-src
        mkdir -p "$site/cellvit_optimus"
        for pkg in engine heads kernels safety; do ln -sfn "$PWD/$pkg" "$site/cellvit_optimus/$pkg"; done
        echo "export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}" >"$RUN_DIR/env.sh"
        echo "editable install failed: folders linked on PYTHONPATH ($site)"
      fi ;;
    environment)
      "$PY" bench/gpu_check.py torch-range || return 1
      nvidia-smi || true
      "$PY" bench/gpu_check.py device --out "$prefix.device.json" || return 1 ;;
    backbone)
      bench_step "$prefix" bench/test_bench_backbone.py bench/test_bench_backbone_bf16.py -k "not budget" ;;
    e2e)
      local big=$RUN_DIR/big.tiff waited=0
      while [ ! -f "$big" ] && [ -f "$RUN_DIR/big.pid" ] && kill -0 "$(cat "$RUN_DIR/big.pid")" 2>/dev/null \
          && [ "$waited" -lt 90 ]; do sleep 1; waited=$((waited + 1)); done
      if [ -f "$big" ]; then echo "big slide: $big (waited $waited s)"
      else echo "big slide: not built in time, the bench builds it"; fi
      OPTIMUS_BENCH_BIG_SLIDE=$big bench_step "$prefix" bench/test_bench_e2e_gpu.py -k "not auto" ;;
    residual)
      bench_step "$prefix" bench/test_bench_residual.py ;;
    gpu-tests)
      if [ -n "${GPU_CHECK_COLLECT_ONLY:-}" ]; then
        "${PYTEST[@]}" -m gpu --benchmark-disable --collect-only "${GPU_TESTS[@]}"; return
      fi
      "${PYTEST[@]}" -m gpu --benchmark-disable --junitxml="$prefix.xml" "${GPU_TESTS[@]}" ;;
    budget)
      bench_step "$prefix" bench/test_bench_backbone.py -k budget ;;
    decode)
      bench_step "$prefix" bench/test_bench_gpu_decode.py -k "not cpu-backend" ;;
    report)
      "$PY" bench/gpu_check.py report --from "$OUT" --out-dir "$OUT" ;;
    *) echo "unknown step $name" >&2; return 2 ;;
  esac
}

planned_of() {
  local want=$1 l
  for l in "${PLAN[@]}"; do
    read -r n p _ <<<"$l"
    if [ "$n" = "$want" ]; then echo "$p"; return; fi
  done
  echo 0
}

if [ "$MODE" = step ]; then
  MODE_OF_RUN=${GPU_CHECK_MODE:-run}
  run_step_body "$2" "$3"
  exit $?
fi

if [ "$MODE" = prepare ]; then
  prepare; exit $?
fi

timeline() {  # the plan, as the run will follow it
  local t=0 i=0 l n p lim what
  echo "gpu_check: timeline ($MODE): step, planned s, limit s (timeout -k $KILL_AFTER_S), planned start"
  for l in "${PLAN[@]}"; do
    read -r n p lim what <<<"$l"
    i=$((i + 1))
    printf 'gpu_check: plan %02d %-12s %4d s  limit %4d s  at %4d s  %s\n' "$i" "$n" "$p" "$lim" "$t" "$what"
    t=$((t + p))
  done
  printf 'gpu_check: plan total %d s planned (at most %d), deadline %d s\n' "$t" "$PLAN_MAX_S" "$DEADLINE_S"
  echo "planned_total_s=$t"
  [ "$t" -le "$PLAN_MAX_S" ]
}

RUN_DIR=$(mktemp -d /tmp/gpu_check.XXXXXX)
export RUN_DIR
if [ "$MODE" != run ]; then trap 'rm -rf "$RUN_DIR"' EXIT; fi
export OPTIMUS_SHARED_DATA=$RUN_DIR/data
data_dir "$OPTIMUS_SHARED_DATA"
status=0
timeline || { say "timeline" FAILED "more than $PLAN_MAX_S s planned"; status=1; }

# -- the rehearsal on the CPU ------------------------------------------------------------------------------
if [ "$MODE" = dry-run ]; then
  export GPU_CHECK_DRY_RUN=1
  steps=()
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
  # the package itself: editable, no dependencies, the interpreter's own setuptools
  if "$PY" -m pip install -q --dry-run --no-index --no-deps --no-build-isolation -e . \
      >"$RUN_DIR/pip-pkg.log" 2>&1; then
    steps+=("install package=dry-run:pip install -e . --no-deps --no-build-isolation")
  else
    steps+=("install package=FAILED:$(grep -m1 -i error "$RUN_DIR/pip-pkg.log")"); status=1
  fi
  # collection of every gpu test and bench with the carried data, and a real read of that data
  if "${PYTEST[@]}" --benchmark-disable --collect-only -m gpu "${GPU_TESTS[@]}" "${GPU_BENCH[@]}" \
      >"$RUN_DIR/collect.log" 2>&1; then
    n=$(grep -cE '::' "$RUN_DIR/collect.log")
    steps+=("collect gpu tests and bench=dry-run:$n collected with OPTIMUS_SHARED_DATA=$OPTIMUS_SHARED_DATA")
  else
    steps+=("collect gpu tests and bench=FAILED:$(grep -m1 -E 'Error|error' "$RUN_DIR/collect.log")"); status=1
  fi
  # what each pytest step of the device run selects (a -k typo would waste the one run)
  for s in backbone e2e residual gpu-tests budget decode; do
    GPU_CHECK_MODE=run GPU_CHECK_COLLECT_ONLY=1 bash bench/gpu_check.sh --step "$s" "$RUN_DIR/collect-$s" \
      >"$RUN_DIR/collect-$s.log" 2>&1
    n=$(grep -cE '::' "$RUN_DIR/collect-$s.log")
    if [ "$n" -ge 1 ]; then steps+=("step $s selects=dry-run:$n tests")
    else
      steps+=("step $s selects=FAILED:nothing collected ($(tail -1 "$RUN_DIR/collect-$s.log"))"); status=1
    fi
  done
  "${PYTEST[@]}" --benchmark-disable tests/engine/wsi/test_gpu_decode.py -k "spliced_streams_decode" \
    --junitxml="$RUN_DIR/tests.xml" >"$RUN_DIR/tests.log" 2>&1 || status=1
  names=$(for l in "${PLAN[@]}"; do read -r n _ <<<"$l"; printf '%s ' "$n"; done)
  steps+=("device steps=dry-run:not run (need CUDA): $names")
  STEP_ARGS=(); for s in "${steps[@]}"; do STEP_ARGS+=(--step "$s"); done
  # a dry run's results are not a GPU's: never in bench/results (GPU_CHECK_RESULTS_DIR keeps them, for tests)
  "$PY" bench/gpu_check.py report --out-dir "${GPU_CHECK_RESULTS_DIR:-$RUN_DIR/results}" \
    --junit "$RUN_DIR/tests.xml" "${STEP_ARGS[@]}" || status=1
  echo "gpu_check: exit $status ($MODE)"
  exit "$status"
fi

# -- the device run (and its CPU simulation): each step under timeout -k, its files in $OUT at once --------
export GPU_CHECK_MODE=$MODE
if [ -z "${OUT:-}" ]; then OUT=$RUN_DIR/out; fi
mkdir -p "$OUT"
export OUT
START=$(date +%s)
STEP_PID=""
BIG_PID=""
CURRENT=""
CURRENT_PREFIX=""
CURRENT_T0=0
CURRENT_INDEX=0

elapsed() { echo $(( $(date +%s) - START )); }

step_result() {  # name index rc seconds planned limit status-hint prefix: the step's JSON, then the aggregate
  "$PY" bench/gpu_check.py step-result --name "$1" --index "$2" --rc "$3" --seconds "$4" --planned "$5" \
    --limit "$6" --hint "$7" --prefix "$8" --aggregate || true
}

on_signal() {  # cut short: stop the step (timeout forwards the signal, then KILLs), record, report, leave
  local sig=$1
  trap - TERM INT
  echo "gpu_check: SIG$sig at $(elapsed) s, during step ${CURRENT:-none}"
  if [ -n "$STEP_PID" ]; then
    kill -"$sig" "$STEP_PID" 2>/dev/null
    wait "$STEP_PID" 2>/dev/null
  fi
  [ -n "$BIG_PID" ] && kill "$BIG_PID" 2>/dev/null
  if [ -n "$CURRENT" ]; then
    step_result "$CURRENT" "$CURRENT_INDEX" 143 $(( $(date +%s) - CURRENT_T0 )) "$(planned_of "$CURRENT")" 0 \
      interrupted "$CURRENT_PREFIX"
  fi
  echo "gpu_check: exit 143 ($MODE, interrupted)"
  exit 143
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

i=0
for l in "${PLAN[@]}"; do
  read -r name planned limit _ <<<"$l"
  i=$((i + 1))
  prefix=$OUT/$(printf '%02d' "$i")-$name
  left=$(( DEADLINE_S - $(elapsed) ))
  [ "$name" = report ] || left=$(( left - 15 ))  # keep 15 s for the report
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "gpu_check: step $name skipped at $(elapsed) s: no time left before the deadline" | tee "$prefix.log"
    step_result "$name" "$i" 0 0 "$planned" 0 skipped "$prefix"
    continue
  fi
  CURRENT=$name; CURRENT_PREFIX=$prefix; CURRENT_INDEX=$i; CURRENT_T0=$(date +%s)
  echo "gpu_check: step $name start at $(elapsed) s (planned $planned s, limit $limit s)" | tee "$prefix.log"
  timeout -k "$KILL_AFTER_S" "$limit" bash bench/gpu_check.sh --step "$name" "$prefix" >>"$prefix.log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"; rc=$?
  STEP_PID=""
  took=$(( $(date +%s) - CURRENT_T0 ))
  CURRENT=""
  step_result "$name" "$i" "$rc" "$took" "$planned" "$limit" "" "$prefix"
  [ "$rc" -eq 0 ] || status=1
  echo "gpu_check: step $name done at $(elapsed) s: rc $rc in $took s (planned $planned s)"
  if [ "$name" = install ] && [ -f "$RUN_DIR/env.sh" ]; then . "$RUN_DIR/env.sh"; export PYTHONPATH; fi
  if [ "$name" = install ] && [ "$rc" -ne 0 ] && [ "$MODE" = run ]; then
    echo "gpu_check: install failed: the measurements need the package; stopping"; break
  fi
  if [ "$name" = environment ] && [ "$MODE" = run ]; then
    # the e2e bench's big slide, built on the CPU while the backbone benches hold the GPU
    "$PY" -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path
from bigslide import make_big_slide
p, part = Path(sys.argv[1]), Path(sys.argv[1]).with_suffix('.part.tiff')
make_big_slide(part, 48, 48, Path(sys.argv[2]))
part.rename(p)  # whole or absent: the e2e step waits for this name" \
      "$RUN_DIR/big.tiff" "$OPTIMUS_SHARED_DATA/slides/$SLIDE" >"$OUT/big-slide.log" 2>&1 &
    BIG_PID=$!
    echo "$BIG_PID" >"$RUN_DIR/big.pid"
  fi
  [ "$name" = report ] && grep '^gpu_check:' "$prefix.log" | grep -v ' start at '
done
[ -n "$BIG_PID" ] && kill "$BIG_PID" 2>/dev/null
echo "gpu_check: exit $status ($MODE) after $(elapsed) s; results in $OUT"
exit "$status"
