#!/usr/bin/env bash
# GPU run 9: the CUDA tests after the worker-decode hardening (c9dd3c7), then qwen3-30b-a3b (int4, compiled
# dense decode) side by side at 16 and 24 GiB after the slot-table fix (no host stall per swap): synthetic
# pp512/tg128, the real Qwen3 trace (tg128), and pp4096 / tg128@d4096 at 16 GiB (issue 4's long tests).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== CUDA tests"; timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/experts tests/kernels tests/engine > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.log" | head -20
echo "=== bench qwen"; timeout 420 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16,24 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,tg128 --repeats 3 --compile \
  --extra "trace:.carry/traces/qwen.route.csv|tg128|16;synthetic:qwen3-30b-a3b|pp4096,tg128@d4096|16" > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -E "^\||done|device:" "$OUT/bench.log" | grep -v -- "---"
