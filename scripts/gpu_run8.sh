#!/usr/bin/env bash
# GPU run 8: why hot/cache spend ~10 ms of host time per token in run 7 (swaps while the CPU worker's
# OpenMP team spins on every core but one?): the same 16 GiB rows with 15 and with 13 CPU threads, and the
# compiled decode recompiling for a second routing source (the fix after run 7).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
for t in 15 13; do
  echo "=== threads $t"; HOTEXPERTS_CPU_THREADS=$t timeout 130 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 \
    --budgets 16 --sources synthetic:qwen3-30b-a3b --tests tg64 --repeats 2 --compile --tag _t$t \
    --placements n-cpu-moe,hot,cache $( [ $t = 13 ] && echo '--extra trace:.carry/traces/qwen.route.csv|tg32|16' ) > "$OUT/bench_t$t.log" 2>&1
  echo "rc=$?"; grep "^|" "$OUT/bench_t$t.log" | grep -v -- "---"; grep -i "capture of the decode step failed" "$OUT/bench_t$t.log" | head -2
done
