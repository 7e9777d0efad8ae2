#!/usr/bin/env bash
# GPU run 6 (final of the session): tests, the CPU kernel at full scale, the compiled dense decode, then
# the side-by-side benchmarks: qwen3-30b-a3b (int4) at 16 and 24 GiB with calibrated synthetic routing and
# the real Qwen3 trace, and mixtral-8x7b (int4) with the real Mixtral trace. Budget: ~9 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -c "from hotexperts.kernels.cpu_build import load_extension, load_error; m = load_extension(); print('ext', m is not None, load_error())"
echo "=== CUDA tests"; timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/experts tests/engine tests/kernels tests/models > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED" "$OUT/gpu_tests.log" | head -20
echo "=== host tests"; timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore tests/kernels/test_cpu_moe.py tests/experts/test_worker_decode.py > "$OUT/cpu_tests.log" 2>&1
echo "rc=$?"; tail -2 "$OUT/cpu_tests.log"
echo "=== cpu kernel"; timeout 150 python3 scripts/bench_cpu_moe.py ${CPU_BENCH_ARGS:---formats int4g32 --tokens 16 --kt-classes ''} > "$OUT/cpu_moe.log" 2>&1
echo "rc=$?"; grep -v "^{" "$OUT/cpu_moe.log" | tail -14
echo "=== compiled decode"; timeout 200 python3 scripts/bench_compile_decode.py --preset qwen3-30b-a3b --variants eager,compiled --tokens 128 --skip-table > "$OUT/compile.log" 2>&1
echo "rc=$?"; tail -12 "$OUT/compile.log"
echo "=== bench qwen"; timeout 240 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16,24 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,tg128 --repeats 3 ${BENCH_ARGS:-} \
  --extra "trace:.carry/traces/qwen.route.csv|tg32|16" > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -v "^  " "$OUT/bench.log" | grep -v "^$" | tail -26
echo "=== bench mixtral"; timeout 200 python3 scripts/gpu_bench.py --preset mixtral-8x7b --quant int4 --budgets 16,24 \
  --sources trace:.carry/traces/humaneval_2_routing.jsonl --tests tg32 --repeats 3 --tag _mixtral ${BENCH_ARGS:-} \
  --placements gpu,cpu-moe,n-cpu-moe,n-cpu-moe+z2,hot,cache > "$OUT/bench_mixtral.log" 2>&1
echo "rc=$?"; grep -v "^  " "$OUT/bench_mixtral.log" | grep -v "^$" | tail -16
