#!/usr/bin/env bash
# GPU run 15 (issue 3 prompt path): the staged experts gathered by the GPU in one launch per part
# (kernels/triton_gather.py) instead of ~150 cudaMemcpyAsync per layer, and the dequantize block sizes from
# run 14's sweep. CUDA tests; the cache's pp512 profile with memcpy vs gather copies; qwen3-30b-a3b at 16 GiB
# side by side (synthetic pp512/pp4096/tg128, real trace tg128).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== CUDA tests"; timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/experts tests/kernels > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.log" | head -10
for mode in memcpy gather; do
  echo "=== profile pp512, staging copies: $mode"; HOTEXPERTS_STAGE_COPY=$mode timeout 70 python3 scripts/profile_prompt.py \
    --preset qwen3-30b-a3b --quant int4 --budget 16 --placements cache --tokens 512 > "$OUT/profile_$mode.log" 2>&1
  echo "rc=$?"; grep -E "tok/s|Error" "$OUT/profile_$mode.log"; mv "$OUT/profile.txt" "$OUT/profile_$mode.txt"
done
echo "=== bench qwen"; timeout 200 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,pp4096,tg128 --repeats 3 --compile \
  --extra "trace:.carry/traces/qwen.route.csv|tg128|16" > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -E "^\||done|device:" "$OUT/bench.log" | grep -v -- "---"
