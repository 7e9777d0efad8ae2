#!/usr/bin/env bash
# GPU run 13 (issue 3, prompt path): after the load-time cache fill (cold_start placeholders), the batched
# prompt observe and the benchmark's prompt warm-up. The CUDA tests, then where pp512's time goes per
# placement (torch.profiler), then qwen3-30b-a3b at 16 GiB side by side (synthetic pp512/tg128, real trace).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== CUDA tests"; timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/experts > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.log" | head -10
echo "=== profile pp512"; timeout 170 python3 scripts/profile_prompt.py --preset qwen3-30b-a3b --quant int4 --budget 16 \
  --placements gpu,n-cpu-moe,cache --tokens 512 > "$OUT/profile.log" 2>&1
echo "rc=$?"; grep -E "tok/s|Error" "$OUT/profile.log"
echo "=== bench qwen"; timeout 260 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,tg128 --repeats 3 --compile \
  --extra "trace:.carry/traces/qwen.route.csv|tg128|16" > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -E "^\||done|device:" "$OUT/bench.log" | grep -v -- "---"
