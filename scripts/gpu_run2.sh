#!/usr/bin/env bash
# GPU run 2: CUDA equivalence tests, then the side-by-side benchmark of the qwen3-30b-a3b shape (int4 experts)
# at 16 and 24 GiB, with calibrated synthetic routing (all four llama-bench tests) and the real Qwen3 trace.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== pytest -m gpu"; timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/models tests/engine tests/experts tests/kernels > "$OUT/pytest_gpu.log" 2>&1; echo "rc=$?"; tail -6 "$OUT/pytest_gpu.log"
echo "=== bench"; timeout ${BENCH_S:-440} python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16,24 \
  --sources synthetic:qwen3-30b-a3b,trace:.carry/traces/qwen.route.csv --tests pp512,pp4096,tg128,tg128@d4096 \
  --fast-tests pp512,tg128 --repeats 3 > "$OUT/bench.log" 2>&1; echo "rc=$?"; grep -v "^  " "$OUT/bench.log" | tail -40
