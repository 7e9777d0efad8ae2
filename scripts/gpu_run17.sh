#!/usr/bin/env bash
# GPU run 17 (issue 6, int8gG experts): CUDA tests (Triton decode/dequantize of int8g32/int8g16 slots run on
# the GPU here, in the interpreter on CPU), the quantized decode GEMV per format and block size, and the
# CPU kernel per format at 24 layers x 128 experts (larger than any cache: DRAM-bound like the real model).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== CUDA tests"; timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore tests/kernels/test_gpu_moe.py \
  tests/loading tests/engine/test_gguf_load.py > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.log" | head -10
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/experts tests/kernels > "$OUT/gpu_tests_m.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests_m.log" | head -10
echo "=== decode GEMV per format"; timeout 120 python3 scripts/bench_gpu_moe.py --quant-sweep int4g32,int8g32,int8g16,int8g16z \
  > "$OUT/quant_sweep.log" 2>&1
echo "rc=$?"; grep -E "default|best|ERROR" "$OUT/quant_sweep.log"
echo "=== CPU kernel per format"; timeout 200 python3 scripts/bench_cpu_moe.py --layers 24 --tokens 32 --kt-classes '' \
  --formats int4g32,int8,int8g32,int8g16z > "$OUT/cpu_moe.log" 2>&1
echo "rc=$?"; grep -E "^(format|int|bf16)|DRAM|total" "$OUT/cpu_moe.log"
