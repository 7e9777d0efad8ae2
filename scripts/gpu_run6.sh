#!/usr/bin/env bash
# GPU run 6: CUDA and host tests, the CPU kernel at full scale (after the 512-bit VNNI rework), `hotexperts
# calibrate` on the machine, and the compiled dense decode (eager vs torch.compile, graphed). ~5 minutes.
# Run 7 (scripts/gpu_run7.sh) has the side-by-side benchmarks.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -c "from hotexperts.kernels.cpu_build import load_extension, load_error; m = load_extension(); print('ext', m is not None, load_error())"
echo "=== CUDA tests"; timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/experts tests/engine tests/kernels tests/models > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED" "$OUT/gpu_tests.log" | head -20
echo "=== host tests"; timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore tests/kernels/test_cpu_moe.py tests/experts/test_worker_decode.py > "$OUT/cpu_tests.log" 2>&1
echo "rc=$?"; tail -2 "$OUT/cpu_tests.log"
echo "=== cpu kernel"; timeout 150 python3 scripts/bench_cpu_moe.py ${CPU_BENCH_ARGS:---formats int4g32 --tokens 16 --kt-classes ''} > "$OUT/cpu_moe.log" 2>&1
echo "rc=$?"; grep -v "^{" "$OUT/cpu_moe.log" | tail -14
echo "=== calibrate"; timeout 100 python3 -m hotexperts calibrate --base h200 --out "$OUT/h200_calibrated.json" > "$OUT/calibrate.log" 2>&1
echo "rc=$?"; tail -8 "$OUT/calibrate.log"
echo "=== compiled decode"; timeout 200 python3 scripts/bench_compile_decode.py --preset qwen3-30b-a3b --variants eager,compiled --tokens 128 --skip-table > "$OUT/compile.log" 2>&1
echo "rc=$?"; tail -8 "$OUT/compile.log"
