#!/usr/bin/env bash
# GPU run 19 (issue 6): the CUDA tests again after moving the two dequantized-chunk tests' tensors to the GPU
# (they ran on CPU tensors and failed on CUDA in run 17), and the decode GEMV per format with the per-format
# blocks (triton_moe._quant_config) as the default.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== CUDA tests"; timeout 90 python3 -m pytest -q -p no:cacheprovider -W ignore tests/kernels/test_gpu_moe.py \
  > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED" "$OUT/gpu_tests.log" | head -10
echo "=== decode GEMV per format"; timeout 70 python3 scripts/bench_gpu_moe.py --quant-sweep int4g32,int8g32,int8g16z \
  > "$OUT/quant_sweep.log" 2>&1
echo "rc=$?"; grep -E "default|ERROR" "$OUT/quant_sweep.log"
