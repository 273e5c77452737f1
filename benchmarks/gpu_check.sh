#!/usr/bin/env bash
# The project's one GPU script: everything a lent GPU should tell us, in one call (< 8 minutes).
#
#   benchmarks/gpu_check.sh [OUT_DIR]
#
# Stages, each writing its JSON into OUT_DIR as soon as it ends (so a run cut short still reports);
# the timeout of each (seconds) in brackets, 450 s in all:
#   1. env.json          device, driver, versions                                            [15]
#   2. cuda_tests.xml    the kernel tests compiled for this GPU (fp32/fp16/bf16) and the      [140]
#                        model on the GPU (bf16/fp16 against fp32 on the CPU, CUDA-graph
#                        decode), then tests_summary.json from their junit XML               [10]
#      kernels_aot.json  every kernel x shipped config compiled for sm_75..sm_90, shared memory
#                        checked: CPU only, so it runs in the background during the tests    [(45)]
#   3. bandwidth.json    measured device copy bandwidth                                       [15]
#   4. moe_bench.jsonl   one MolmoE MoE layer (E=64, top-8, H=2048, I=1024) for T in 1..4096: [55]
#                        our int4/int8 kernels vs the bf16 reference loop, torch._grouped_mm,
#                        bitsandbytes NF4 (one record per test, appended as it ends)
#   5. e2e.jsonl         the whole model at the real shapes (random weights): TTFT for one   [170]
#                        1920x1080 image, decode tokens/s at batch 1 and 4, peak memory, the
#                        bandwidth floor, for release bf16 loop / ours bf16 / int8 / int4 /
#                        int4 small / NF4; int4 within 6 GiB and small within 4.5 GiB
#   6. decode_sweep.jsonl the two decode kernels alone at T = 1 and 4 over candidate tiles     [30]
#                        (sweep_decode.py): data for choosing the launch table; last, as the
#                        least needed, and it stops starting candidates after 20 s
#   7. *.png             plots of moe_bench.jsonl and e2e.jsonl (needs matplotlib; skipped    [5]
#                        with a message otherwise)
#   8. targets.json      each GPU target of the kernel and runtime issues: pass, fail or        [5]
#                        missing (benchmarks/targets.py)
# The GPU machine has no network: install with --no-deps (bitsandbytes travels as a wheel in .whl/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results/latest}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# always install: from the repo root `import molmoe_lite` would succeed without it, but
# molmoe_lite.kernels / molmoe_lite.quantize exist only through the install's folder mapping
python3 -m pip install -q --no-deps --no-build-isolation -e .
# compile-heavy GPU tests run in 8 parallel workers when pytest-xdist is there (the GPU image has it;
# 16 cores, and each worker's CUDA context and test weights take a few GB of the 80)
XDIST=""; timeout 5 python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"

timeout 15 python3 benchmarks/gpu_check.py env --out "$OUT"
# CPU-only, so it overlaps the GPU tests; waited for before any timing runs
( timeout 45 python3 -m molmoe_lite.kernels.aot --json > "$OUT/kernels_aot.json" ) &
AOT_PID=$!
# every kernel test (fp32/fp16/bf16 compiled for this GPU) plus the model-on-GPU tests
timeout 140 python3 -m pytest -q $XDIST -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml" \
  tests/test_kernels_moe.py tests/test_kernels_routing.py tests/test_kernels_norms.py tests/test_model_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
timeout 10 python3 benchmarks/gpu_check.py tests-summary --out "$OUT"
wait "$AOT_PID"
timeout 15 python3 benchmarks/gpu_check.py bandwidth --out "$OUT"
MOLMOE_BENCH_RESULTS="$OUT/moe_bench.jsonl" timeout 55 python3 -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_moe.py 2>&1 | tee "$OUT/moe_bench.log"
timeout 170 python3 benchmarks/bench_e2e.py --out "$OUT" --memory-check --time-budget 150
timeout 30 python3 benchmarks/sweep_decode.py --out "$OUT" --budget-s 20
timeout 5 python3 benchmarks/plot_results.py "$OUT" || true
timeout 5 python3 benchmarks/targets.py "$OUT"
echo "results in $OUT:"; ls -l "$OUT"
