#!/usr/bin/env bash
# GPU run 17 (issue 6, int8gG experts): CUDA tests (Triton decode/dequantize of int8g32/int8g16 slots run on
# the GPU here, in the interpreter on CPU), the quantized decode GEMV per format (default blocks and a
# sweep), then qwen3-30b-a3b with Q8_0-like int8g32 experts (built in memory, quantized on the GPU), every
# placement side by side at 16 GiB: synthetic pp512/tg128 and the real Qwen3 trace tg128.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== CUDA tests"; timeout 90 python3 -m pytest -q -p no:cacheprovider -W ignore tests/kernels/test_gpu_moe.py \
  > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.log" | head -10
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/experts tests/kernels > "$OUT/gpu_tests_m.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests_m.log" | head -10
echo "=== decode GEMV per format"; timeout 70 python3 scripts/bench_gpu_moe.py --quant-sweep int4g32,int8g32,int8g16z \
  > "$OUT/quant_sweep.log" 2>&1
echo "rc=$?"; grep -E "default|best|ERROR" "$OUT/quant_sweep.log"
echo "=== bench int8g32"; timeout 300 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int8g --budgets 16 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,tg128 --repeats 2 --compile \
  --extra "trace:.carry/traces/qwen.route.csv|tg128|16" > "$OUT/bench_int8g.log" 2>&1
echo "rc=$?"; grep -E "^\||done|device:|built|Error" "$OUT/bench_int8g.log" | grep -v -- "---"
