#!/usr/bin/env bash
# GPU run 14 (issue 3 prompt path, issue 8 small calls): after one sort per layer and four launches per
# dequantized chunk (triton_moe.GroupedPass), the staged and resident experts in one pass, chunks sized by
# bytes. CUDA tests; pp512 profile per placement; qwen3-30b-a3b at 16 GiB side by side (synthetic
# pp512/pp4096/tg128, real trace tg128); the dequantize block sweep; small CPU calls from 4 KiB vs 2 MiB pages.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== CUDA tests"; timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/experts tests/kernels > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.log" | head -10
echo "=== profile pp512"; timeout 120 python3 scripts/profile_prompt.py --preset qwen3-30b-a3b --quant int4 --budget 16 \
  --placements gpu,n-cpu-moe,cache --tokens 512 > "$OUT/profile.log" 2>&1
echo "rc=$?"; grep -E "tok/s|Error" "$OUT/profile.log"
echo "=== bench qwen"; timeout 200 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,pp4096,tg128 --repeats 3 --compile \
  --extra "trace:.carry/traces/qwen.route.csv|tg128|16" > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -E "^\||done|device:" "$OUT/bench.log" | grep -v -- "---"
echo "=== dequant sweep"; timeout 40 python3 scripts/bench_dequant.py --experts 27 2>&1 | tee "$OUT/dequant.log"
echo "=== cpu pages"; timeout 100 python3 scripts/bench_cpu_pages.py --gib 4 --calls 300 2>&1
