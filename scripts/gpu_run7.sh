#!/usr/bin/env bash
# GPU run 7: the side-by-side benchmarks. qwen3-30b-a3b (int4) at 16 and 24 GiB with calibrated synthetic
# routing, the real Qwen3 trace at 16 GiB (decode only: 128 tokens), and mixtral-8x7b (int4) with the real
# Mixtral trace (HumanEval, 338 decode tokens). BENCH_ARGS=--compile compiles the dense decode.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "bench args: '${BENCH_ARGS:-}'"
echo "=== bench qwen"; timeout 240 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16,24 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,tg128 --repeats 3 ${BENCH_ARGS:-} \
  --extra "trace:.carry/traces/qwen.route.csv|tg32|16" > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -v "^  " "$OUT/bench.log" | grep -v "^$" | tail -26
echo "=== bench mixtral"; timeout 200 python3 scripts/gpu_bench.py --preset mixtral-8x7b --quant int4 --budgets 16,24 \
  --sources trace:.carry/traces/humaneval_2_routing.jsonl --tests tg32 --repeats 3 --tag _mixtral ${BENCH_ARGS:-} \
  --placements gpu,cpu-moe,n-cpu-moe,n-cpu-moe+z2,hot,cache > "$OUT/bench_mixtral.log" 2>&1
echo "rc=$?"; grep -v "^  " "$OUT/bench_mixtral.log" | grep -v "^$" | tail -16
