#!/usr/bin/env bash
# GPU validation run 1: CUDA tests, fused GPU kernel bench, decode speed, CPU kernel bench (H200 machine).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
echo "=== pytest -m gpu"; timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider tests/models tests/engine tests/experts tests/kernels > "$OUT/pytest_gpu.log" 2>&1; echo "rc=$?"; tail -25 "$OUT/pytest_gpu.log"
echo "=== bench_gpu_moe"; timeout 110 python3 scripts/bench_gpu_moe.py > "$OUT/gpu_moe.log" 2>&1; echo "rc=$?"; tail -30 "$OUT/gpu_moe.log"
echo "=== bench_decode_gpu"; timeout 130 python3 scripts/bench_decode_gpu.py --tokens 64 > "$OUT/decode.log" 2>&1; echo "rc=$?"; tail -30 "$OUT/decode.log"
echo "=== bench_cpu_moe"; timeout 190 python3 scripts/bench_cpu_moe.py --kt-path .carry/kt_kernel_site --tokens 32 > "$OUT/cpu_moe.log" 2>&1; echo "rc=$?"; tail -30 "$OUT/cpu_moe.log"
