#!/usr/bin/env bash
# The one GPU-machine script (replaces gpu_run1..19.sh): named steps, run in the order given.
#
#   bash scripts/gpu_run.sh STEP [STEP...]        from the repository root, on the device machine
#
# Steps (each runs in its own bash under `timeout`; a failing step is reported and the next one runs):
#   env          versions, GPU, CPU flags, cores, RAM
#   tests        pytest -m gpu over $TESTS_PATHS (default: tests)
#   bench        python -m hotexperts bench $BENCH_ARGS --json run/bench.json
#   context      scripts/vram_context.py: what the process holds outside torch's allocator, per stage (init,
#                cuBLAS, cuBLASLt, Triton, CUDA graph, an Engine over $CONTEXT_MODEL) and setting -> run/context.json
#   decode-profile  scripts/profile_decode.py over $MODEL per placement in $PROFILE_PLACEMENTS (gpu): graphed
#                and eager tok/s, kernels per token and the ones that take the time ($PROFILE_ARGS: more flags)
#   kernels      micro-benchmarks named in $KERNELS (gpu_moe, quant_sweep, dequant, cpu_moe, cpu_pages, profile)
#   model        the comparison GGUF at $MODEL unless it exists: hotexperts make-model --preset $PRESET
#                --format gguf --quant $QUANT (~2 min, ~21 GB for qwen3-30b-a3b)
#   routing      our router over one 512-token ubatch of $MODEL: distinct experts per MoE layer (min/median/max)
#   stock-build  llama-bench into $LLAMA_DIR: unpacks .carry/llama-bin/llama-bin.tar.xz.part-* when present,
#                else builds .carry/llama.cpp (CUDA sm_90, -j 16, ~4.5 min) and saves
#                $OUT/llama-bin.tar.xz.part-aa, -ab, ... (< 16 MiB each) for the next run's .carry/llama-bin/
#   stock        per -ncmoe N in $NCMOE: llama-bench -m $MODEL $STOCK_ARGS -ncmoe N -o json, nvidia-smi peak of
#                the process every 200 ms (CUDA context included) -> run/stock/ncmoe_N.json
#   ours         per stock point in $STOCK_DIR (default: this run's run/stock): hotexperts bench on $MODEL at
#                --vram-budget <stock peak>MiB, our process's peak measured the same way -> run/ours/ncmoe_N.json
#   ours-run     like ours, in ONE bench process (the model loaded once): --vram-budget is every stock peak
#                (MiB), nvidia-smi sampled over the whole run and each placement's peak taken inside its window
#                (compare.py ours-run) -> run/ours/ncmoe_N.json
#   proof        the same bench ($PROOF_ARGS) from each tree in $PROOF_TREES (git archives carried in
#                .carry/trees/<name>, e.g. the code before and after a refactor) -> run/proof_<name>.json
#   compare      scripts/stock/compare.py merge: $STOCK_DIR + $OURS_DIRS -> compare.md / compare.json
#
# Variables (defaults): OUT (./out), HX_DEADLINE_S (570: steps get at most what is left of it, so the packing
#   at the end always runs inside a 600 s call), MODEL (/dev/shm/q30.gguf), PRESET (qwen3-30b-a3b), QUANT (q4_k),
#   NCMOE (48,40,32,24,0), STOCK_ARGS (-ngl 99 -fa 1 -t 16 -p 512 -n 128 -r 3 -lm none), STOCK_DIR, OURS_DIRS,
#   OURS_NCMOE (all stock points), OURS_PLACEMENTS (cpu-moe,n-cpu-moe,hot,cache), OURS_ROUTING
#   (qwen3-30b-a3b), OURS_ARGS ("": more bench flags), BUDGET_UNIT (mib: --vram-budget NMiB; gib: N/1024
#   as a bare GiB number, for a bench that takes no suffix), BENCH_ARGS, TESTS_PATHS, KERNELS (gpu_moe,dequant,cpu_moe), LLAMA_SRC (.carry/llama.cpp),
#   LLAMA_PARTS (.carry/llama-bin), LLAMA_DIR (/tmp/llama-bin).
# Carried wheels: if .whl/ holds wheels they are installed into /tmp/site (PYTHONPATH=/tmp/site:$PWD).
#
# Output (what comes back is at most 8 files): $OUT/console.log (everything printed), $OUT/results.tar.gz
#   (run/: every log and JSON of the steps; unpack into docs/results/<run>/), $OUT/compare.md and
#   $OUT/compare.json (after `compare`), $OUT/llama-bin.tar.xz.part-* (after a `stock-build` that built).
#
# The stock llama.cpp comparison (docs/benchmarks.md, "How to reproduce"); run prepare.sh here first:
#   here:   bash scripts/stock/prepare.sh                        # -> .carry/llama.cpp (~22 MB)
#   call 1: bash scripts/gpu_run.sh env stock-build               carry .carry/llama.cpp (+ .whl)   est. ~5 min
#           then: mkdir -p .carry/llama-bin && cp <files>/llama-bin.tar.xz.part-* .carry/llama-bin/
#   call 2: bash scripts/gpu_run.sh model routing stock-build stock    carry .carry/llama-bin (+ .whl)  est. ~7 min
#           then unpack results.tar.gz into docs/results/<run>/ (its stock/ holds the stock points)
#   call 3: STOCK_DIR=docs/results/<run>/run/stock bash scripts/gpu_run.sh model ours compare
#           carry .whl if needed; ~2 min for the model, then each point loads the model and runs 4 placements
#           (not yet timed): split the points over calls with OURS_NCMOE=48,40 / OURS_NCMOE=32,24,0, then merge
#           here: python3 scripts/stock/compare.py merge --stock DIR --ours DIR1 DIR2 --md ... --json ...
#   (one call can run `model routing stock-build stock ours compare` when the points fit in HX_DEADLINE_S.)
set -euo pipefail

SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
mkdir -p "${OUT:-out}"
OUT=$(cd "${OUT:-out}" && pwd)
export OUT
export RES=$OUT/run
export HX_START=${HX_START:-$(date +%s)} HX_DEADLINE_S=${HX_DEADLINE_S:-570}
export MODEL=${MODEL:-/dev/shm/q30.gguf} PRESET=${PRESET:-qwen3-30b-a3b} QUANT=${QUANT:-q4_k}
export NCMOE=${NCMOE:-48,40,32,24,0}
export STOCK_ARGS=${STOCK_ARGS:--ngl 99 -fa 1 -t 16 -p 512 -n 128 -r 3 -lm none}
export STOCK_DIR=${STOCK_DIR:-$RES/stock} OURS_DIRS=${OURS_DIRS:-$RES/ours}
export OURS_PLACEMENTS=${OURS_PLACEMENTS:-cpu-moe,n-cpu-moe,hot,cache} OURS_NCMOE=${OURS_NCMOE:-}
export OURS_ROUTING=${OURS_ROUTING:-qwen3-30b-a3b} OURS_ARGS=${OURS_ARGS:-} BUDGET_UNIT=${BUDGET_UNIT:-mib}
export BENCH_ARGS=${BENCH_ARGS:---model preset:qwen3-30b-a3b --expert-quant int4 --vram-budget 16 \
--route-synthetic qwen3-30b-a3b --tests pp512,tg128 --repeats 3 --compile}
export TESTS_PATHS=${TESTS_PATHS:-tests} KERNELS=${KERNELS:-gpu_moe,dequant,cpu_moe}
export LLAMA_SRC=${LLAMA_SRC:-.carry/llama.cpp} LLAMA_PARTS=${LLAMA_PARTS:-.carry/llama-bin}
export LLAMA_DIR=${LLAMA_DIR:-/tmp/llama-bin} PROOF_TREES=${PROOF_TREES:-}
export PROOF_ARGS=${PROOF_ARGS:---route-synthetic qwen3-30b-a3b --tests pp512,tg128 --repeats 2 --vram-budget 16 \
--placements n-cpu-moe,cache}
export PYTHONUNBUFFERED=1 PY=${PY:-python3}
case ":${LD_LIBRARY_PATH:-}:" in
  *":$LLAMA_DIR:"*) ;;
  *) export LD_LIBRARY_PATH=$LLAMA_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;;  # llama-bench's shared libs
esac

# ---- helpers (also used by the per-step child shells) ----------------------------------------------------
left() { echo $(( HX_START + HX_DEADLINE_S - $(date +%s) )); }

budget() {          # budget CAP -> seconds a command may take: CAP, or what is left of the deadline less 20
  local l; l=$(( $(left) - 20 ))
  [ "$l" -lt "$1" ] && echo "$l" || echo "$1"
}

guard() {           # guard CAP CMD... : timeout with budget CAP; prints rc, never fails the caller
  local t rc=0; t=$(budget "$1"); shift
  if [ "$t" -lt 10 ]; then echo "skipped (no time left): $*" >&3; return 0; fi
  timeout -k 10 "$t" "$@" || rc=$?
  echo "rc=$rc$( [ "$rc" = 124 ] && echo " (timed out after ${t}s)")" >&3     # fd 3: the console
}

point_field() {     # point_field FILE KEY
  "$PY" -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"
}

points_by_ncmoe() { # the ncmoe_*.json files of folder $1, most CPU layers first
  "$PY" -c 'import glob,json,sys; fs=glob.glob(sys.argv[1] + "/ncmoe_*.json")
print(" ".join(sorted(fs, key=lambda f: -json.load(open(f))["ncmoe"])))' "$1"
}

# ---- steps -------------------------------------------------------------------------------------------------
step_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  echo "cores $(nproc), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, /dev/shm $(df -h /dev/shm | awk 'NR==2 {print $4}') free"
  grep -o -E 'avx512[a-z_0-9]*|amx[a-z_0-9]*|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
}

step_tests() {
  guard 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider -W ignore $TESTS_PATHS > "$RES/pytest_gpu.log" 2>&1
  grep -E "passed|failed|skipped|deselected|no tests ran|^FAILED|^ERROR" "$RES/pytest_gpu.log" | tail -20 || true
}

step_bench() {
  guard 560 "$PY" -m hotexperts bench $BENCH_ARGS --json "$RES/bench.json" > "$RES/bench.log" 2>&1
  grep -E "^\||^device:|[Ee]rror" "$RES/bench.log" | grep -v -- "---" || true
}

step_context() {
  guard 300 "$PY" scripts/vram_context.py --model "${CONTEXT_MODEL:-preset:tiny-qwen3-moe}" \
    --json "$RES/context.json" > "$RES/context.log" 2>&1
  cat "$RES/context.log"
}

step_decode_profile() {  # where an all-GPU decode token's time goes, per $PROFILE_PLACEMENTS on $MODEL
  local p out
  for p in ${PROFILE_PLACEMENTS:-gpu}; do
    echo "--- $p"
    out=$RES/decode_profile_${p//[^a-z0-9]/_}
    guard 150 env OUT="$out" "$PY" scripts/profile_decode.py --model "$MODEL" --placement "$p" ${PROFILE_ARGS:-} \
      > "$out.log" 2>&1
    head -n 30 "$out.log"
  done
}

step_kernels() {
  local k
  for k in ${KERNELS//,/ }; do
    echo "--- $k"
    case $k in
      gpu_moe)     guard 150 env OUT="$RES" "$PY" scripts/bench_gpu_moe.py > "$RES/gpu_moe.log" 2>&1 ;;
      quant_sweep) guard 90 env OUT="$RES" "$PY" scripts/bench_gpu_moe.py --quant-sweep int4g32,int8g32,int8g16z \
                     > "$RES/quant_sweep.log" 2>&1 ;;
      dequant)     guard 60 "$PY" scripts/bench_dequant.py --experts 27 > "$RES/dequant.log" 2>&1 ;;
      cpu_moe)     guard 200 env OUT="$RES" "$PY" scripts/bench_cpu_moe.py ${CPU_MOE_ARGS:---formats int4g32,int8 \
                     --tokens 16} > "$RES/cpu_moe.log" 2>&1 ;;
      cpu_pages)   guard 120 env OUT="$RES" "$PY" scripts/bench_cpu_pages.py --gib 4 --calls 300 \
                     > "$RES/cpu_pages.log" 2>&1 ;;
      profile)     guard 170 env OUT="$RES" "$PY" scripts/profile_prompt.py --preset qwen3-30b-a3b --quant int4 \
                     --budget 16 --placements gpu,n-cpu-moe,cache --tokens 512 > "$RES/profile.log" 2>&1 ;;
      *) echo "unknown kernel benchmark: $k"; continue ;;
    esac
    tail -n 12 "$RES/$k.log" 2>/dev/null || true
  done
}

step_model() {
  if [ -s "$MODEL" ]; then echo "$MODEL exists ($(du -h "$MODEL" | cut -f1))"; touch "$MODEL.done"; return 0; fi
  local s; s=$(date +%s)
  echo "free where it goes: $(df -h "$(dirname "$MODEL")" | awk 'NR==2 {print $4}')"
  guard 300 "$PY" -m hotexperts make-model --preset "$PRESET" --format gguf --quant "$QUANT" --out "$MODEL" \
    > "$RES/make_model.log" 2>&1
  echo "seconds=$(( $(date +%s) - s ))"; tail -n 2 "$RES/make_model.log"; ls -la "$MODEL"
  [ -s "$MODEL" ] && touch "$MODEL.done"      # complete: a step in a parallel run may wait for it
}

wait_model() {      # the model step of a parallel invocation finished (MODEL_WAIT=1), or the file is there
  local i
  if [ "${MODEL_WAIT:-0}" = 1 ]; then
    for i in $(seq 300); do [ -f "$MODEL.done" ] && break; sleep 2; done
  fi
  [ -s "$MODEL" ] || { echo "no $MODEL: run the model step first"; exit 1; }
}

step_routing() {
  "$PY" scripts/stock/routing_check.py prompt --out "$RES/routing_prompt.txt"
  guard 200 "$PY" -m hotexperts trace --model "$MODEL" --prompts "$RES/routing_prompt.txt" --raw --max-tokens 1 \
    --out /tmp/hx_routing.npz > "$RES/routing_trace.log" 2>&1
  "$PY" scripts/stock/routing_check.py stats /tmp/hx_routing.npz --json "$RES/routing.json"
}

step_stock_build() {
  mkdir -p "$LLAMA_DIR"
  if compgen -G "$LLAMA_PARTS/llama-bin.tar.xz.part-*" > /dev/null; then
    cat "$LLAMA_PARTS"/llama-bin.tar.xz.part-* | xz -d | tar -x -C "$LLAMA_DIR"
    echo "unpacked saved llama-bench binaries from $LLAMA_PARTS"
  else
    build_llama
  fi
  "$LLAMA_DIR/llama-bench" --version 2>&1 | tail -n 3
}

build_llama() {
  [ -f "$LLAMA_SRC/CMakeLists.txt" ] || { echo "no $LLAMA_SRC: run scripts/stock/prepare.sh and carry it"; exit 1; }
  local b=/tmp/llama-build s; s=$(date +%s)
  cmake -S "$LLAMA_SRC" -B "$b" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMIT="$(cat "$LLAMA_SRC/HOTEXPERTS_SOURCE" 2>/dev/null \
    | cut -d' ' -f1 || echo unknown)" -DLLAMA_BUILD_NUMBER=0 > "$RES/stock_build.log" 2>&1
  local rc=0
  timeout -k 10 "$(budget 420)" cmake --build "$b" --target llama-bench -j 16 >> "$RES/stock_build.log" 2>&1 || rc=$?
  echo "build rc=$rc seconds=$(( $(date +%s) - s ))"
  [ "$rc" = 0 ] || { tail -n 20 "$RES/stock_build.log"; exit 1; }
  cp -a "$b"/bin/llama-bench "$b"/bin/*.so* "$LLAMA_DIR"/
  strip --strip-unneeded "$LLAMA_DIR"/*.so* "$LLAMA_DIR"/llama-bench 2>/dev/null || true
  if ! "$LLAMA_DIR/llama-bench" --version > /dev/null 2>&1; then      # never ship a binary strip broke
    echo "stripped llama-bench does not start: packing the unstripped build"
    cp -a "$b"/bin/llama-bench "$b"/bin/*.so* "$LLAMA_DIR"/
  fi
  tar -C "$LLAMA_DIR" -cf - . | xz -6 -T 16 | split -b 15m - "$OUT/llama-bin.tar.xz.part-"
  ls -la "$OUT"/llama-bin.tar.xz.part-*
}

ensure_llama() {
  [ -x "$LLAMA_DIR/llama-bench" ] || step_stock_build
}

step_stock() {
  ensure_llama
  wait_model
  mkdir -p "$RES/stock/raw"
  local n raw t rc
  for n in ${NCMOE//,/ }; do
    raw=$RES/stock/raw
    t=$(budget 150)
    if [ "$t" -lt 10 ]; then echo "-ncmoe $n: skipped (no time left)"; continue; fi
    rc=0
    # shellcheck disable=SC2086
    "$PY" scripts/stock/peak.py --out "$raw/peak_$n.json" --stdout "$raw/llama_bench_$n.json" --timeout "$t" -- \
      "$LLAMA_DIR/llama-bench" -m "$MODEL" $STOCK_ARGS -ncmoe "$n" -o json 2> "$raw/llama_bench_$n.log" || rc=$?
    "$PY" scripts/stock/compare.py stock-point --ncmoe "$n" --bench "$raw/llama_bench_$n.json" \
      --peak "$raw/peak_$n.json" --out "$RES/stock/ncmoe_$n.json"
    echo "-ncmoe $n: rc=$rc $(tail -n 1 "$raw/llama_bench_$n.log")"
    "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print("  peak", d["peak_mib"], "MiB ("
              + str(d["peak_method"]) + "); pp512", d["pp512"], "tg128", d["tg128"])' "$RES/stock/ncmoe_$n.json"
  done
}

step_ours() {
  [ -s "$MODEL" ] || { echo "no $MODEL: run the model step first"; exit 1; }
  local dir=$RES/ours f n mib b t rc
  mkdir -p "$dir/raw"
  for f in $(points_by_ncmoe "$STOCK_DIR"); do
    n=$(point_field "$f" ncmoe); mib=$(point_field "$f" peak_mib)
    case ",${OURS_NCMOE:-$n}," in *",$n,"*) ;; *) continue ;; esac
    if [ -z "$mib" ]; then echo "-ncmoe $n: stock has no peak; skipped"; continue; fi
    if [ "$BUDGET_UNIT" = gib ]; then b=$("$PY" -c "print($mib / 1024)"); else b=${mib}MiB; fi
    t=$(budget 240)
    if [ "$t" -lt 10 ]; then echo "-ncmoe $n: skipped (no time left)"; continue; fi
    rc=0
    # shellcheck disable=SC2086
    "$PY" scripts/stock/peak.py --out "$dir/raw/peak_$n.json" --stdout "$dir/raw/bench_$n.log" --timeout "$t" -- \
      "$PY" -m hotexperts bench --model "$MODEL" --route-synthetic "$OURS_ROUTING" --tests pp512,tg128 \
      --repeats 2 --vram-budget "$b" --placements "$OURS_PLACEMENTS" $OURS_ARGS --json "$dir/raw/bench_$n.json" \
      2> "$dir/raw/bench_$n.err" || rc=$?
    "$PY" scripts/stock/compare.py ours-point --ncmoe "$n" --budget-mib "$mib" --bench "$dir/raw/bench_$n.json" \
      --peak "$dir/raw/peak_$n.json" --out "$dir/ncmoe_$n.json"
    echo "-ncmoe $n: budget $b, rc=$rc; $(tail -n 1 "$dir/raw/bench_$n.err")"
    grep -E "^\||^device:" "$dir/raw/bench_$n.log" | grep -v -- "---" | tail -n 8 || true
    grep -i -E "error" "$dir/raw/bench_$n.err" | tail -n 3 || true
  done
}

step_ours_run() {
  [ -s "$MODEL" ] || { echo "no $MODEL: run the model step first"; exit 1; }
  local dir=$RES/ours budgets t rc=0
  mkdir -p "$dir/raw"
  budgets=$("$PY" -c 'import glob,json,sys
ps = [json.load(open(f)) for f in glob.glob(sys.argv[1] + "/ncmoe_*.json")]
want = [n for n in sys.argv[2].split(",") if n]
print(",".join(str(p["peak_mib"]) + "MiB" for p in sorted(ps, key=lambda p: -p["ncmoe"])
               if p.get("peak_mib") and (not want or str(p["ncmoe"]) in want)))' "$STOCK_DIR" "$OURS_NCMOE")
  [ -n "$budgets" ] || { echo "no stock peaks in $STOCK_DIR"; exit 1; }
  t=$(budget 540)
  echo "budgets $budgets (timeout ${t}s)"
  # shellcheck disable=SC2086
  "$PY" scripts/stock/peak.py --out "$dir/raw/peak_run.json" --stdout "$dir/raw/bench_run.log" --timeout "$t" -- \
    "$PY" -m hotexperts bench --model "$MODEL" --route-synthetic "$OURS_ROUTING" --tests pp512,tg128 \
    --repeats 2 --vram-budget "$budgets" --placements "$OURS_PLACEMENTS" $OURS_ARGS --json "$dir/raw/bench_run.json" \
    2> "$dir/raw/bench_run.err" || rc=$?
  echo "bench rc=$rc; $(tail -n 1 "$dir/raw/bench_run.err")"
  "$PY" scripts/stock/compare.py ours-run --stock "$STOCK_DIR" --bench "$dir/raw/bench_run.json" \
    --peak "$dir/raw/peak_run.json" --out-dir "$dir"
  grep -E "^\||^device:|^- |^plans" "$dir/raw/bench_run.log" | grep -v -- "---" || true
}

step_proof() {
  [ -s "$MODEL" ] || { echo "no $MODEL: run the model step first"; exit 1; }
  local name
  for name in ${PROOF_TREES//,/ }; do
    [ -d ".carry/trees/$name" ] || { echo "no .carry/trees/$name"; continue; }
    echo "--- $name"
    # shellcheck disable=SC2086
    guard 240 env -C ".carry/trees/$name" PYTHONPATH=".:${PYTHONPATH:-}" "$PY" -m hotexperts bench --model "$MODEL" $PROOF_ARGS \
      --json "$RES/proof_$name.json" > "$RES/proof_$name.log" 2>&1     # its own package first on sys.path
    grep -E "^\||^device:" "$RES/proof_$name.log" | grep -v -- "---" || true
  done
}

step_compare() {
  # shellcheck disable=SC2086
  "$PY" scripts/stock/compare.py merge --stock "$STOCK_DIR" --ours $OURS_DIRS --md "$RES/compare.md" \
    --json "$RES/compare.json"
  cp "$RES/compare.md" "$RES/compare.json" "$OUT"/
}

# ---- driver ------------------------------------------------------------------------------------------------
if [ "${1:-}" = "--step" ]; then            # child shell: one step, errexit applies inside it
  exec 3>&1
  fn="step_${2//-/_}"
  declare -F "$fn" > /dev/null || { echo "unknown step: $2"; exit 2; }
  "$fn"
  exit 0
fi

[ "$#" -gt 0 ] || { sed -n '2,/^set -euo/p' "$SELF" | sed '$d'; exit 2; }
mkdir -p "$RES"
exec > >(tee -a "$OUT/console.log") 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
finish() {
  tar -czf "$OUT/results.tar.gz" -C "$OUT" run && rm -rf "$RES"
  echo "=== done in $(( $(date +%s) - HX_START )) s; files in $OUT:"; ls -la "$OUT"
}
trap finish EXIT
for s in "$@"; do
  echo "=== $s ($(( $(date +%s) - HX_START )) s in, $(left) s left)"
  rc=0
  bash "$SELF" --step "$s" || rc=$?
  [ "$rc" = 0 ] || echo "step $s failed: rc=$rc"
done
