#!/usr/bin/env bash
# GPU run 11: do 1- and 2-expert CPU calls (a cache's misses) run faster on fewer threads? int4g32 at full
# Qwen3 scale, top-1 and top-2, 4 / 8 / 16 threads.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
for k in 1 2; do for t in 4 8 16; do
  echo "=== int4 top-$k threads $t"; timeout 60 python3 scripts/bench_cpu_moe.py --formats int4g32 --top-k $k --threads $t --tokens 64 --kt-classes '' --dram-gib 2 > "$OUT/cpu_k${k}_t$t.log" 2>&1
  echo "rc=$?"; grep "^int4g32  | q8" "$OUT/cpu_k${k}_t$t.log"
done; done
