#!/usr/bin/env bash
# GPU run 16 (issue 3): staged prompt copies, memcpy per run vs one GPU gather launch per part, side by side:
# n-cpu-moe and cache at 16 GiB, pp512 and pp4096, the same model and routing, one process per mode.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
for mode in memcpy gather memcpy gather; do
  echo "=== staging copies: $mode"; HOTEXPERTS_STAGE_COPY=$mode timeout 55 python3 scripts/gpu_bench.py --preset qwen3-30b-a3b \
    --quant int4 --budgets 16 --sources synthetic:qwen3-30b-a3b --tests pp512,pp4096 --repeats 3 \
    --placements n-cpu-moe,cache --tag "_$mode" > "$OUT/bench_$mode.log" 2>&1
  echo "rc=$?"; grep -E "^\| 16" "$OUT/bench_$mode.log"
done
