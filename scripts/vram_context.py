"""What the process holds on the GPU beyond torch's allocator (the plan's "context"), stage by stage and per
setting, measured on the GPU machine (issue 16: run at stock's --cpu-moe VRAM; run 20 measured 0.52-0.55
GiB at the bench's start and 0.79 GiB in a later plan, and did not say what it was).

    python scripts/vram_context.py [--settings default,cublas-ws0,...] [--model preset:tiny-qwen3-moe]
                                   [--json out.json]

Each setting runs in a fresh child process (the variables must be set before CUDA starts). Per stage the
child prints the device's used memory minus torch's reserved memory ("outside", what vram_reserved calls
the context), torch's allocated and reserved bytes, all in MiB:
    init        torch.cuda.init() and one small tensor: the CUDA context itself
    cublas      one bf16 matmul: the cuBLAS handle (its workspace is torch-allocated: see "allocated")
    cublaslt    F.linear with a bias in bf16 (the cuBLASLt path and its workspace)
    triton      one Triton qlinear GEMV and one gpu_moe decode call (module loads of our kernels)
    graph       a CUDA graph of a matmul captured and replayed
    engine      (--model) an Engine over the model, a prompt and 8 decode steps: all of the above in use
Settings (name: environment):
    default       as the bench runs
    cublas-ws0    CUBLAS_WORKSPACE_CONFIG=:0:0 (no cuBLAS workspace; slower GEMMs possible)
    cublas-ws1    CUBLAS_WORKSPACE_CONFIG=:4096:1 (one 4 MiB chunk)
    cublaslt-0    CUBLASLT_WORKSPACE_SIZE=0 (KiB: no cuBLASLt workspace)
    eager-load    CUDA_MODULE_LOADING=EAGER (what lazy loading, torch's default, saves)
    expandable    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the allocator's slack: reserved -
                  allocated)
Nothing here is a number the engine uses: read the table, then change the engine where a setting pays.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {
    "default": {},
    "cublas-ws0": {"CUBLAS_WORKSPACE_CONFIG": ":0:0"},
    "cublas-ws1": {"CUBLAS_WORKSPACE_CONFIG": ":4096:1"},
    "cublaslt-0": {"CUBLASLT_WORKSPACE_SIZE": "0"},
    "eager-load": {"CUDA_MODULE_LOADING": "EAGER"},
    "expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
}
MiB = 2 ** 20


def _sample(stage: str) -> dict:
    import torch

    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    return {"stage": stage, "outside_mib": (total - free - reserved) / MiB,
            "allocated_mib": torch.cuda.memory_allocated() / MiB, "reserved_mib": reserved / MiB}


def _triton_stage() -> None:
    import torch

    from hotexperts.kernels.gpu_moe import gpu_moe
    from hotexperts.kernels.qlinear import qlinear
    from hotexperts.quant import quantize_int8g

    w = quantize_int8g(torch.randn(256, 256), 32).to("cuda")
    qlinear(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), w)
    E, D, I = 4, 256, 128
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    gpu_moe(x, torch.zeros(1, 2, dtype=torch.long, device="cuda"), torch.ones(1, 2, device="cuda"),
            torch.randn(E, 2 * I, D, device="cuda", dtype=torch.bfloat16),
            torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16))


def _graph_stage() -> None:
    import torch

    a = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        a @ a                                                       # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        b = a @ a
    g.replay()
    del b


def _engine_stage(model: str) -> None:
    from hotexperts.engine.engine import Engine
    from hotexperts.engine.sampling import SamplingParams

    engine = Engine.load(model, max_context=256)
    list(engine.generate(list(range(1, 65)), SamplingParams(max_tokens=8, temperature=0.0)))
    engine.close()


def child(model: str | None) -> list[dict]:
    import torch
    import torch.nn.functional as F

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    rows = [_sample("init")]
    a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    a @ a
    rows.append(_sample("cublas"))
    F.linear(a, a, torch.zeros(256, device="cuda", dtype=torch.bfloat16))
    rows.append(_sample("cublaslt"))
    for name, stage in (("triton", _triton_stage), ("graph", _graph_stage)):
        try:
            stage()
            rows.append(_sample(name))
        except Exception as e:                                      # a stage that cannot run here: say so
            rows.append({"stage": name, "error": f"{type(e).__name__}: {e}"})
    if model:
        _engine_stage(model)
        rows.append(_sample("engine"))
    return rows


def _run_setting(name: str, model: str | None) -> list[dict]:
    env = os.environ | SETTINGS[name]
    cmd = [sys.executable, __file__, "--child"] + (["--model", model] if model else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return [{"stage": "-", "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(results: dict) -> str:
    lines = ["| setting | stage | outside torch MiB | torch allocated MiB | torch reserved MiB |",
             "|---|---|---|---|---|"]
    for name, rows in results.items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {name} | {r['stage']} | error: {r['error']} | | |")
            else:
                lines.append(f"| {name} | {r['stage']} | {r['outside_mib']:.0f} | {r['allocated_mib']:.0f} | "
                             f"{r['reserved_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    ap.add_argument("--model", default=None, help="also run an Engine over this model (e.g. a preset)")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.model)))
        return 0
    names = [n.strip() for n in a.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        print(f"error: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}",
              file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: scripts/vram_context.py measures a CUDA device; none is available here",
              file=sys.stderr)
        return 2
    results = {n: _run_setting(n, a.model) for n in names}
    print(_table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
