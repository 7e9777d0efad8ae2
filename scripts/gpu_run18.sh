#!/usr/bin/env bash
# GPU run 18 (issue 6): qwen3-30b-a3b with Q8_0-like int8g32 experts (built in memory, quantized on the GPU),
# every placement side by side at 16 GiB: synthetic pp512/tg128 and the real Qwen3 trace tg128.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== bench int8g32"; timeout 420 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int8g --budgets 16 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,tg128 --repeats 3 --compile \
  --extra "trace:.carry/traces/qwen.route.csv|tg128|16" > "$OUT/bench_int8g.log" 2>&1
echo "rc=$?"; grep -E "^\||done|device:|built|Error" "$OUT/bench_int8g.log" | grep -v -- "---"
