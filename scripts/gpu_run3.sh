#!/usr/bin/env bash
# GPU run 3: CPU-kernel correctness on AVX-512 VNNI, CPU-kernel speed, then the side-by-side benchmark again
# (qwen3-30b-a3b shape, int4 experts) after the decode-attention and thread fixes.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== cpu kernel tests"; timeout 80 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_cpu_moe.py > "$OUT/cpu_tests.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/cpu_tests.log"
echo "=== cpu kernel bench"; timeout 90 python3 scripts/bench_cpu_moe.py --formats int4g32,int8 --tokens 16 --kt-classes '' > "$OUT/cpu_moe.log" 2>&1; echo "rc=$?"; grep -v "^{" "$OUT/cpu_moe.log" | tail -14
echo "=== bench"; timeout 390 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16,24 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,tg128 --repeats 3 \
  --extra "trace:.carry/traces/qwen.route.csv|tg128|16;synthetic:qwen3-30b-a3b|pp4096,tg128@d4096|16" > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -v "^  " "$OUT/bench.log" | grep -v "^device\|^$\|^| ---\|^| budget" | tail -40
