#!/usr/bin/env bash
# GPU run 12 (issue 6), NOT YET RUN (session 3 got no machine for it): a Q4_K GGUF of the qwen3-30b-a3b shape
# written on the machine (random weights, experts Q4_K, packed on the GPU), then every placement on it at
# 16 GiB (experts stay int4 from Q4_K). make-model's time at this size is unknown: give it the most room.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
echo "=== make-model q4_k"; s=$(date +%s)
timeout 300 python3 -m hotexperts make-model --preset qwen3-30b-a3b --format gguf --quant q4_k --out /tmp/q4k.gguf --device cuda > "$OUT/make_model.log" 2>&1
echo "rc=$? seconds=$(( $(date +%s) - s ))"; tail -3 "$OUT/make_model.log"; ls -la /tmp/q4k.gguf || exit 0
echo "=== bench gguf"; timeout 270 python3 -m hotexperts bench --model /tmp/q4k.gguf --vram-budget 16 \
  --placements gpu,cpu-moe,n-cpu-moe,hot,cache --tests pp512,tg128 --repeats 2 --route-synthetic qwen3-30b-a3b \
  --compile --json "$OUT/bench_gguf_q4k.json" > "$OUT/bench_gguf.log" 2>&1
echo "rc=$?"; grep -E "^\||device:|error" "$OUT/bench_gguf.log" | grep -v -- "---" | tail -12
