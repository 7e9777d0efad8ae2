#!/usr/bin/env bash
# GPU run 5: after run 4's fixes (IEEE fp32 grouped GEMMs, ids checked before the C++ call, one-lane
# polling), GPU-computed misses (--moe-gpu-misses), Triton dequant for prompt batches, prompt streaming of
# only the experts without a slot. CUDA + host tests, the int4 decode block-size sweep, then the bench at
# 16 GiB (qwen3-30b-a3b, int4, calibrated synthetic routing) with and without GPU-computed misses.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -c "from hotexperts.kernels.cpu_build import load_extension, load_error; m = load_extension(); print('ext', m is not None, load_error())"
echo "=== CUDA tests"; timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/experts tests/engine tests/kernels tests/models > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/gpu_tests.log" | head -30
echo "=== host tests"; timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore tests/kernels/test_cpu_moe.py tests/experts/test_worker_decode.py > "$OUT/cpu_tests.log" 2>&1
echo "rc=$?"; tail -3 "$OUT/cpu_tests.log"
echo "=== int4 sweep"; timeout 120 python3 scripts/bench_gpu_moe.py --quant-sweep 2>&1 | tail -6
echo "=== bench"; timeout ${BENCH_S:-330} python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,tg64 --repeats 3 \
  --placements gpu,cpu-moe,n-cpu-moe,n-cpu-moe+z1,hot,cache,cache+z0,cache+z2 > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -v "^  " "$OUT/bench.log" | grep -v "^$" | tail -16
grep "^  " "$OUT/bench.log" | grep -i -E "warn|error|fall" | head
