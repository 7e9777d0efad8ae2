#!/usr/bin/env python
"""Decode tok/s with the dense part of the T=1 step eager vs torch.compile'd (Inductor), graphed as usual.

    python scripts/bench_compile_decode.py [--preset qwen3-30b-a3b] [--expert-dtype int4g32]
        [--variants eager-nograph,eager,compiled,compiled-cdt] [--tokens 128] [--prompt-len 128]
    python scripts/bench_compile_decode.py --device cpu --preset tiny-qwen3-moe --tokens 16   # dry run

Builds the preset in memory (random weights; engine/presets.build_in_memory), all experts on the GPU behind
experts.hybrid.GpuExecutor (graph-safe: the whole step is one CUDA graph), then per variant:
    eager-nograph   no compile, no CUDA graph (every launch from Python; context only)
    eager           no compile, CUDA graph (today's default decode)
    eager-fused     + one q/k/v matmul per layer (model.fuse_qkv()), no compile
    compiled        model.compile_decode() (Inductor defaults, q/k/v fused: what --compile does), CUDA graph
    compiled-unfused  compiled with three q/k/v matmuls (compile_decode(fuse_qkv=False))
    compiled-nograph  compiled, no CUDA graph (host cost of Dynamo guards + Inductor wrappers per layer:
                    what a hybrid executor's eager decode would see)
    compiled-cdt    + coordinate_descent_tuning (gpt-fast's setting: T=1 matmuls become Triton reductions
                    that Inductor may fuse with norms / casts; longer compile)
    compiled-ma     mode "max-autotune-no-cudagraphs" (autotuned matmul templates; longest compile)
For each: warm-up request (compile + capture, timed), a timed request of --tokens greedy tokens (EOS off),
the compiled stages' stats (graphs per stage = no recompile per layer, Inductor seconds), kernels per step
from torch.profiler over eager-launched steps (the same kernels the graph replays) and over graph replays,
greedy tokens and logits against the first variant. Every section catches and prints its own errors.
Prints a table; writes JSON to $OUT/bench_compile_decode.json when $OUT is set. A second run is faster to
compile (Inductor's on-disk FX graph cache, /tmp/torchinductor_$USER by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotexperts.engine.cuda_graph import EagerDecodeStep  # noqa: E402
from hotexperts.engine.generate import Generator  # noqa: E402
from hotexperts.engine.sampling import SamplingParams  # noqa: E402

VARIANTS = {    # name -> (use_cuda_graph, fuse_qkv, compile_decode kwargs or None)
    "eager-nograph": (False, False, None),
    "eager": (True, False, None),
    "eager-fused": (True, True, None),
    "compiled": (True, True, {}),
    "compiled-unfused": (True, False, {}),
    "compiled-nograph": (False, True, {}),
    "compiled-cdt": (True, True, {"options": {"coordinate_descent_tuning": True}}),
    "compiled-ma": (True, True, {"mode": "max-autotune-no-cudagraphs"}),
}


def section(name: str, result: dict):
    """`with section(name, result):` runs its block; an error is printed (short traceback), stored in
    result["errors"][name] and swallowed, so the next section runs."""
    class _S:
        def __enter__(self):
            return self

        def __exit__(self, typ, exc, tb):
            if exc is None:
                return False
            msg = f"{typ.__name__}: {exc}"
            result.setdefault("errors", {})[name] = msg
            print(f"  [{name}] FAILED: {msg}", flush=True)
            traceback.print_exception(typ, exc, tb, limit=6)
            return True                          # swallow: the next section runs
    return _S()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args):
    from hotexperts.engine.presets import build_in_memory
    from hotexperts.experts.hybrid import GpuExecutor

    t0 = time.perf_counter()
    lm = build_in_memory(args.preset, dtype=args.dtype, device=args.device, seed=0,
                         expert_dtype=args.expert_dtype)
    cfg = dataclasses.replace(lm.cfg, eos_token_ids=())            # never stop early
    executor = GpuExecutor(lm.store, args.device)
    sync(args.device)
    mem = torch.cuda.memory_allocated() / 2**30 if args.device.type == "cuda" else 0.0
    print(f"built {args.preset} in {time.perf_counter() - t0:.1f}s; GpuExecutor graph_safe="
          f"{executor.graph_safe}; {mem:.1f} GiB on the GPU; torch {torch.__version__}", flush=True)
    return lm.model, executor, cfg


NO_KERNEL = {f"aten::{op}" for op in (
    "view", "reshape", "_reshape_alias", "_unsafe_view", "transpose", "t", "select", "slice", "expand",
    "unsqueeze", "squeeze", "as_strided", "chunk", "split", "split_with_sizes", "unbind", "permute", "alias",
    "detach", "lift_fresh", "empty", "empty_strided", "empty_like", "resolve_conj", "resolve_neg",
    "contiguous", "to", "_to_copy", "result_type", "item", "_local_scalar_dense", "is_nonzero")}


def count_kernels(fn, steps: int, device: torch.device) -> float | None:
    """Kernels per call of fn(i), from torch.profiler. CUDA: device activities (kernels, memcpy, memset).
    CPU (a dry-run stand-in): leaf aten ops that compute (no views, no composites) + Inductor C++ kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn(0)
    sync(device)
    with profile(activities=acts) as prof:
        for i in range(steps):
            fn(i + 1)
        sync(device)
    if device.type == "cuda":
        n = sum(e.count for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
    else:
        def computes(e) -> bool:
            return (e.name.startswith("aten::") or "cpp_fused" in e.name) and e.name not in NO_KERNEL

        n = sum(1 for e in prof.events() if computes(e) and not any(computes(c) for c in e.cpu_children))
    return n / steps


def top_kernels(fn, steps: int, device: torch.device, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            fn(i)
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def run_variant(name: str, model, executor, cfg, args, prompt: list[int]) -> dict:
    use_graph, fuse, compile_kw = VARIANTS[name]
    res: dict = {"variant": name, "graph": use_graph, "fuse_qkv": fuse, "compile": compile_kw}
    print(f"\n== {name} ==", flush=True)
    torch._dynamo.reset()                              # each compiled variant from scratch (recompile limit)
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    gen = None
    with section("setup", res):
        model.compile_decode(False)                    # off, q/k/v unfused
        model.fuse_qkv(fuse)
        if compile_kw is not None:
            kw = dict(compile_kw, fuse_qkv=fuse)
            if args.device.type == "cpu":           # dry run: Inductor's C++ kernels show in the profiler
                kw["options"] = {**kw.get("options", {}), "cpp.enable_kernel_profile": True}
            model.compile_decode(**kw)
        ctx = args.prompt_len + args.tokens + 16
        gen = Generator(model, executor, cfg, args.device, ctx, use_cuda_graph=use_graph)
    if gen is None:
        return res
    with section("warmup", res), torch.no_grad():      # compile (compiled variants) + capture (graphed)
        t0 = time.perf_counter()
        list(gen.generate(prompt, SamplingParams(max_tokens=4)))
        sync(args.device)
        res["warmup_seconds"] = time.perf_counter() - t0
        res["graphed"] = bool(gen.decode_step.graphed)
        stages = model.decode_stages
        res["stages"] = stages.stats() if stages is not None else None
        print(f"  warm-up (compile + capture) {res['warmup_seconds']:.1f}s, graphed={res['graphed']}"
              + (f", stages {res['stages']}" if stages is not None else ""), flush=True)
    with section("timed", res):
        out = list(gen.generate(prompt, SamplingParams(max_tokens=args.tokens)))
        last = gen.last
        res.update(tokens=out, decode_tok_per_s=last.gen_tps,
                   ms_per_token=1e3 * last.decode_seconds / max(last.decode_steps, 1),
                   prefill_tok_per_s=last.prompt_tps)
        print(f"  decode {last.gen_tps:.1f} tok/s ({res['ms_per_token']:.2f} ms/token), prefill "
              f"{last.prompt_tps:.0f} tok/s", flush=True)
    with section("logits", res), torch.no_grad():     # the first decode steps' logits, for comparison
        gen.prefill(prompt)
        rows, tok = [], out[0] if res.get("tokens") else 1
        for i in range(4):
            lg = gen.decode_one(tok, len(prompt) + i).float()
            rows.append(lg.cpu())
            tok = int(lg.argmax())
        res["_logits"] = torch.stack(rows)
    base = len(prompt) + 8
    eager_step = EagerDecodeStep(model, gen.kv, executor, args.device)    # the same kernels, one by one
    with section("kernels_eager_launch", res), torch.no_grad():
        res["kernels_per_step"] = count_kernels(lambda i: eager_step(1, base + i), args.profile_steps,
                                                args.device)
        print(f"  kernels per step (launched from Python): {res['kernels_per_step']:.0f}", flush=True)
    if res.get("graphed"):
        with section("kernels_graph_replay", res), torch.no_grad():
            res["kernels_per_replay"] = count_kernels(lambda i: gen.decode_step(1, base + i),
                                                      args.profile_steps, args.device)
            print(f"  kernels per graph replay (as the profiler sees them): {res['kernels_per_replay']:.0f}",
                  flush=True)
    if not args.skip_table:
        with section("profile_table", res), torch.no_grad():
            res["profile"] = top_kernels(lambda i: eager_step(1, base + i), args.profile_steps, args.device)
            print(res["profile"], flush=True)
    with section("teardown", res):
        model.compile_decode(False)
    return res


def compare(results: list[dict]) -> None:
    ref = next((r for r in results if "_logits" in r), None)
    for r in results:
        if ref is None or r is ref:
            continue
        with section("compare", r):
            if "_logits" in r:
                d = (r["_logits"] - ref["_logits"]).abs()
                r["max_abs_logit_diff_vs_" + ref["variant"]] = float(d.max())
                r["same_argmax_vs_" + ref["variant"]] = bool(
                    torch.equal(r["_logits"].argmax(-1), ref["_logits"].argmax(-1)))
            if "tokens" in r and "tokens" in ref:
                same = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref["tokens"], strict=False))
                             if a != b), None)
                r["greedy_tokens_identical_vs_" + ref["variant"]] = same is None
                r["first_divergence"] = same


def _f(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def print_table(variants: list[dict]) -> None:
    print(f"\n{'variant':<18}{'graphed':>8}{'tok/s':>9}{'ms/tok':>8}{'warmup s':>10}{'inductor s':>11}"
          f"{'graphs':>12}{'kern/step':>10}{'kern/replay':>12}  same tokens")
    for r in variants:
        st = r.get("stages") or {}
        ind = sum((st.get("compile_seconds") or {}).values()) if st else None
        graphs = ",".join(f"{k[0]}{v}" for k, v in (st.get("graphs") or {}).items()) or "-"
        same = next((v for k, v in r.items() if k.startswith("greedy_tokens_identical")), "-")
        errors = f"  ERRORS: {list(r['errors'])}" if r.get("errors") else ""
        print(f"{r['variant']:<18}{str(r.get('graphed', '-')):>8}{_f(r.get('decode_tok_per_s'), '.1f'):>9}"
              f"{_f(r.get('ms_per_token'), '.2f'):>8}{_f(r.get('warmup_seconds'), '.1f'):>10}"
              f"{_f(ind, '.1f'):>11}{graphs:>12}{_f(r.get('kernels_per_step'), '.0f'):>10}"
              f"{_f(r.get('kernels_per_replay'), '.0f'):>12}  {same}{errors}")
    print("(graphs: p/l/h = prepare / layer / head graphs compiled; l = one per layer kind: no recompile "
          "per layer)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) | float32 (default on CPU)")
    ap.add_argument("--expert-dtype", default="int4g32", help="int4g32 | int8 | none (= dtype)")
    ap.add_argument("--variants", default="eager-nograph,eager,eager-fused,compiled,compiled-unfused,"
                                          "compiled-nograph,compiled-cdt",
                    help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--skip-table", action="store_true", help="no torch.profiler top-kernel tables")
    ap.add_argument("--device", default="cuda", help="cpu = a dry run of this script (tiny presets)")
    args = ap.parse_args()
    args.device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    args.expert_dtype = None if args.expert_dtype in ("none", "") else args.expert_dtype
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu --preset tiny-qwen3-moe for a dry run)")
        return 1
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        return 2
    result: dict = {"preset": args.preset, "torch": torch.__version__, "variants": []}
    model = executor = cfg = None
    with section("build", result):
        model, executor, cfg = build(args)
        result["gpu"] = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    if model is None:
        print(json.dumps(result, indent=2))
        return 1
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, min(cfg.vocab_size, 32000), (args.prompt_len,), generator=g).tolist()
    for name in names:
        try:
            result["variants"].append(run_variant(name, model, executor, cfg, args, prompt))
        except Exception as exc:                               # belt and braces: never lose the others
            result["variants"].append({"variant": name, "errors": {"run": f"{type(exc).__name__}: {exc}"}})
            traceback.print_exc()
    compare(result["variants"])
    print_table(result["variants"])
    for r in result["variants"]:
        r.pop("_logits", None)
        if "tokens" in r:
            r["tokens"] = r["tokens"][:32]
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_compile_decode.json"
        with section("write_json", result):
            path.write_text(json.dumps(result, indent=2, default=str))
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
