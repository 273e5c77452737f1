#!/usr/bin/env bash
# The project's one GPU script: everything a lent GPU should tell us, in one call (< 8 minutes).
#
#   benchmarks/gpu_check.sh [OUT_DIR]
#
# Stages, each writing its JSON into OUT_DIR as soon as it ends (so a run cut short still reports):
#   1. env.json          device, driver, versions
#   2. cuda_tests.json   the tests that need CUDA (bf16 on the GPU against fp32 on the CPU, kernels)
#   3. bandwidth.json    measured device copy bandwidth
#   4. kernels_aot.json  every kernel x shipped config compiled for sm_75..sm_90, shared memory checked
#   5. moe_bench.jsonl   one MolmoE MoE layer (E=64, top-8, H=2048, I=1024) for T in 1..4096: our int4/int8
#                        kernels vs the bf16 reference loop, torch._grouped_mm, bitsandbytes NF4
#   6. dense_model.json  dense bf16 MolmoE at the real shapes (random weights): time to first token
#                        for one 1920x1080 image, decode tokens/s at batch 1
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
python3 -c "import molmoe_lite" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .

python3 benchmarks/gpu_check.py env --out "$OUT"
timeout 240 python3 -m pytest -q -m cuda tests -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log"
python3 benchmarks/gpu_check.py tests-summary --out "$OUT"
timeout 60 python3 benchmarks/gpu_check.py bandwidth --out "$OUT"
timeout 60 python3 -m molmoe_lite.kernels.aot --json > "$OUT/kernels_aot.json"
MOLMOE_BENCH_RESULTS="$OUT/moe_bench.jsonl" timeout 200 python3 -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_moe.py 2>&1 | tee "$OUT/moe_bench.log"
timeout 180 python3 benchmarks/gpu_check.py dense-model --out "$OUT"
echo "results in $OUT:"; ls -l "$OUT"
