#!/usr/bin/env bash
# GPU run 10: mixtral-8x7b (int4, compiled dense decode) with the real Mixtral trace at 16 and 24 GiB after
# the slot-table fix; the CPU kernel at full Qwen3 scale for int8 and bf16 (top-8), and int4 with 1 and 2
# experts per call (what a cache miss costs: the hybrid decode's CPU calls are that small).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== bench mixtral"; timeout 260 python3 scripts/gpu_bench.py --preset mixtral-8x7b --quant int4 --budgets 16,24 \
  --sources trace:.carry/traces/humaneval_2_routing.jsonl --tests tg64 --repeats 3 --tag _mixtral --compile \
  --placements gpu,cpu-moe,n-cpu-moe,hot,cache > "$OUT/bench_mixtral.log" 2>&1
echo "rc=$?"; grep -E "^\||done|device:" "$OUT/bench_mixtral.log" | grep -v -- "---"
for k in 1 2; do
  echo "=== cpu kernel int4 top-$k"; timeout 70 python3 scripts/bench_cpu_moe.py --formats int4g32 --top-k $k --tokens 64 --kt-classes '' > "$OUT/cpu_k$k.log" 2>&1
  echo "rc=$?"; grep -v "^{" "$OUT/cpu_k$k.log" | tail -6
done
echo "=== cpu kernel int8,bf16"; timeout 150 python3 scripts/bench_cpu_moe.py --formats int8,bf16 --tokens 16 --kt-classes '' > "$OUT/cpu_int8_bf16.log" 2>&1
echo "rc=$?"; grep -v "^{" "$OUT/cpu_int8_bf16.log" | tail -10
