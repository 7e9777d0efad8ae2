#!/usr/bin/env bash
# GPU run 2: the side-by-side benchmark of the qwen3-30b-a3b shape (int4 experts) at 16 and 24 GiB with
# calibrated synthetic routing and the real Qwen3 trace (pp512, tg128), then the deep tests at 16 GiB.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
timeout ${BENCH_S:-570} python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16,24 \
  --sources synthetic:qwen3-30b-a3b,trace:.carry/traces/qwen.route.csv --tests pp512,tg128 --repeats 3 \
  --extra "synthetic:qwen3-30b-a3b|pp4096,tg128@d4096|16" > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -v "^  " "$OUT/bench.log" | tail -60
