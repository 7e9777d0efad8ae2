#!/usr/bin/env bash
# GPU run 18 (issue 6): a Q4_K_M GGUF of the qwen3-30b-a3b shape written on the machine (Q4_K experts, Q6_K
# down matrices in llama.cpp's use_more_bits layers), loaded as w13 int4g32 + w2 int8g16 (both exact), then
# every placement at 16 GiB: synthetic pp512/tg128 and the real Qwen3 trace tg128, one process.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== make-model q4_k_m"; s=$(date +%s)
timeout 200 python3 -m hotexperts make-model --preset qwen3-30b-a3b --format gguf --quant q4_k_m --out /tmp/q4km.gguf --device cuda > "$OUT/make_model.log" 2>&1
echo "rc=$? seconds=$(( $(date +%s) - s ))"; tail -2 "$OUT/make_model.log"; ls -la /tmp/q4km.gguf || exit 0
echo "=== bench q4_k_m"; timeout 380 python3 scripts/gpu_bench.py --model /tmp/q4km.gguf --budgets 16 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,tg128 --repeats 2 --compile \
  --extra "trace:.carry/traces/qwen.route.csv|tg128|16" > "$OUT/bench_q4km.log" 2>&1
echo "rc=$?"; grep -E "^\||done|device:|loaded|Error" "$OUT/bench_q4km.log" | grep -v -- "---"
