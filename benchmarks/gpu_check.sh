#!/usr/bin/env bash
# The project's one GPU script: everything a lent GPU should tell us, in one call, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--only STAGE,STAGE...]     (OUT_DIR default: benchmarks/results)
#   bash benchmarks/gpu_check.sh --plan                                 (the stages and their limits)
#
# Every stage writes into a work folder, /tmp/molmoe-gpu-check/<date>-<card>. On exit, however the
# stages ended, that folder is packed into OUT_DIR/gpu-check-<date>-<card>.tar.gz and OUT_DIR gets
# gpu-check-<date>-<card>-summary.txt (the stage table and the targets table): two files, so the
# results come back from a machine that returns only a few. Unpack with
#   tar -xzf gpu-check-<date>-<card>.tar.gz -C benchmarks/results
#
# Stages, in order (limit in seconds; at its limit a stage gets SIGINT, so pytest still writes its
# junit report and the Python scripts their last record, then SIGKILL GRACE seconds later):
#   wheels        pip install of the wheels carried in .whl/ (bitsandbytes), only when there are any
#   install       pip install --no-deps -e . (molmoe_lite.kernels and .quantize exist only through it)
#   env           env.json (device, versions), then bandwidth.json (device copy: the bandwidth ceiling)
#   cuda-tests    the kernel tests compiled for this GPU and the model on the GPU (60 s per test);
#                 without a GPU only the CUDA-marked tests, which skip
#   moe-bench     one MoE layer (E=64, top-8, H=2048, I=1024) per provider: T=1 and T=1024 of every
#                 provider first, then the other T; int4/int8 checked against the dense reference
#   e2e           the two memory checks, then the whole model per provider (TTFT, decode); stops
#                 itself E2E_MARGIN seconds before its limit
#   decode-sweep  the decode kernels over candidate tiles; starts no candidate SWEEP_MARGIN seconds
#                 before its limit
#   report        tests_summary.json, targets.json and targets.txt
#   plots         PNGs of moe_bench.jsonl and e2e.jsonl
#   pack          the archive (run on exit)
# --only reruns some of the measuring stages (cuda-tests, moe-bench, e2e, decode-sweep) into a
# <date>-<card>-rerun-<HHMM> folder; the setup stages and report and plots always run.
# The GPU machine has no network: pip installs with --no-deps, bitsandbytes travels as a wheel.
set -uo pipefail
cd "$(dirname "$0")/.."

STAGES=(wheels install env cuda-tests moe-bench e2e decode-sweep report plots pack)
declare -A LIMIT=([wheels]=10 [install]=20 [env]=30 [cuda-tests]=110 [moe-bench]=80 [e2e]=105
                  [decode-sweep]=30 [report]=15 [plots]=25 [pack]=5)
GRACE=3          # seconds between a stage's SIGINT and its SIGKILL (pack is killed at once)
SETUP=10         # before the stages: finding the card (nvidia-smi), finding pytest's plugins
E2E_MARGIN=12    # bench_e2e stops its provider this long before the stage's limit
SWEEP_MARGIN=15  # sweep_decode starts no candidate after its limit minus this

worst_case() {
  local total=$SETUP stage
  for stage in "${STAGES[@]}"; do total=$((total + LIMIT[$stage] + GRACE)); done
  total=$((total - GRACE))  # pack: tar, killed at its limit
  echo "$total"
}

print_plan() {
  local stage
  for stage in "${STAGES[@]}"; do printf '  %-13s %4s s\n' "$stage" "${LIMIT[$stage]}"; done
  local total; total=$(worst_case)
  printf 'worst case: %s s (%dm%02ds): the limits, %s s of grace per stage, %s s of setup\n' \
    "$total" $((total / 60)) $((total % 60)) "$GRACE" "$SETUP"
}

OUT_DIR=benchmarks/results
ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    --plan) print_plan; exit 0 ;;
    --only) ONLY=",$2,"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) OUT_DIR=$1 ;;
  esac
  shift
done

PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
CARD=$(timeout 5 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
SLUG=$(echo "${CARD:-cpu}" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/-$//')
NAME="$(date -u +%Y-%m-%d)-$SLUG${ONLY:+-rerun-$(date -u +%H%M)}"
WORK=${TMPDIR:-/tmp}/molmoe-gpu-check/$NAME
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$OUT_DIR"
ARCHIVE="$OUT_DIR/gpu-check-$NAME.tar.gz"
SUMMARY="$OUT_DIR/gpu-check-$NAME-summary.txt"

MEASURING=",cuda-tests,moe-bench,e2e,decode-sweep,"  # what --only chooses from; the other stages always run
selected() { [ -z "$ONLY" ] || [[ $MEASURING != *",$1,"* ]] || [[ $ONLY == *",$1,"* ]]; }

# run_stage NAME COMMAND...: COMMAND under NAME's limit; output to the console and WORK/logs/NAME.log;
# one line per stage in WORK/stages.txt. A stage's failure never stops the script.
run_stage() {
  local name=$1; shift
  local limit=${LIMIT[$name]} start=$SECONDS rc verdict
  if ! selected "$name"; then return; fi
  echo "=== $(date -u +%H:%M:%S) stage $name, limit ${limit} s: $*"
  timeout -s INT -k "$GRACE" "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) verdict="ok" ;;
    124) verdict="cut at its limit (SIGINT)" ;;
    137) verdict="killed ${GRACE} s after its limit" ;;
    *) verdict="exit status $rc" ;;
  esac
  printf '%-13s %4d s of %4d s  %s\n' "$name" $((SECONDS - start)) "$limit" "$verdict" | tee -a "$WORK/stages.txt"
}

skip_stage() {  # skip_stage NAME REASON
  if selected "$1"; then printf '%-13s %4d s of %4d s  skipped: %s\n' "$1" 0 "${LIMIT[$1]}" "$2" | tee -a "$WORK/stages.txt"; fi
}

pack() {
  {
    echo "gpu_check.sh on ${CARD:-no GPU}, $(date -u '+%Y-%m-%d %H:%M UTC'), $SECONDS s in all"
    echo "stage         took     limit  outcome"
    cat "$WORK/stages.txt" 2>/dev/null
    echo
    cat "$WORK/targets.txt" 2>/dev/null || echo "no targets table (the report stage did not finish)"
  } > "$WORK/summary.txt"
  cp "$WORK/summary.txt" "$SUMMARY"
  timeout "${LIMIT[pack]}" tar -czf "$ARCHIVE.part" -C "$(dirname "$WORK")" "$NAME" && mv "$ARCHIVE.part" "$ARCHIVE"
  echo "=== results: $ARCHIVE ($(du -h "$ARCHIVE" 2>/dev/null | cut -f1)), $SUMMARY"
  cat "$SUMMARY"
}
trap pack EXIT
trap 'exit 130' INT  # so that an outside interrupt still packs what exists
trap 'exit 143' TERM

echo "gpu_check.sh: ${CARD:-no GPU found (a rehearsal: the GPU-only parts skip)}; work folder $WORK"
print_plan

if ls .whl/*.whl >/dev/null 2>&1; then
  run_stage wheels "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  skip_stage wheels "no wheels in .whl/"
fi
run_stage install "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
run_stage env "$PYTHON" benchmarks/gpu_check.py env bandwidth --out "$WORK"

# pytest-timeout and xdist are on the GPU machine's image, and optional here
PLUGINS=$(timeout 5 "$PYTHON" -c 'import importlib.util as u; print(*[m for m in ("pytest_timeout", "xdist") if u.find_spec(m)])')
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider)
[[ $PLUGINS == *pytest_timeout* ]] && PYTEST+=(--timeout 60)
CUDA_TESTS=(tests/test_kernels_moe.py tests/test_kernels_routing.py tests/test_kernels_norms.py tests/test_model_cuda.py)
if [ -n "$CARD" ]; then
  # 8 workers: the compiles dominate; each worker's CUDA context and test weights take a few GB
  [[ $PLUGINS == *xdist* ]] && CUDA_TESTS+=(-n 8)
else
  CUDA_TESTS+=(-m cuda)
fi
run_stage cuda-tests "${PYTEST[@]}" --junitxml "$WORK/cuda_tests.xml" "${CUDA_TESTS[@]}"
run_stage moe-bench env MOLMOE_BENCH_RESULTS="$WORK/moe_bench.jsonl" \
  "${PYTEST[@]}" -s --junitxml "$WORK/moe_bench.xml" benchmarks/test_bench_moe.py
run_stage e2e "$PYTHON" benchmarks/bench_e2e.py --out "$WORK" --time-budget $((LIMIT[e2e] - E2E_MARGIN))
run_stage decode-sweep "$PYTHON" benchmarks/sweep_decode.py --out "$WORK" --budget-s $((LIMIT[decode-sweep] - SWEEP_MARGIN))
run_stage report "$PYTHON" benchmarks/gpu_check.py tests-summary targets --out "$WORK"
run_stage plots "$PYTHON" benchmarks/plot_results.py "$WORK"
