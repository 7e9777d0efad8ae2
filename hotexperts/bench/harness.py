"""The side-by-side benchmark: several placements, one process, one model, the same VRAM budget.

    report = run_bench(lm, placements=["gpu", "cpu-moe", "n-cpu-moe", "hot", "cache"], budgets=[16 GiB],
                       tests=parse_tests("pp512,tg128"), repeats=3, source=routing_source(...))
Each (budget, placement) builds its executor over the SAME expert store and dense model, runs every test
`repeats` times (median, min, max) and records peak VRAM (torch's allocator peak, dense weights included)
and the cache's hit rate. Placement names:
    gpu         every expert in VRAM (the reference; ignores the budget, reported as such)
    cpu-moe     every routed expert on the CPU (llama.cpp --cpu-moe)
    n-cpu-moe   layer offload: the smallest N of CPU layers (the most GPU layers) that fits the budget
    hot         the seed's design: K slots per layer (K = what the budget leaves / MoE layers), WindowLFU
    cache       one slot budget shared by all layers, adaptive policy (--policy to change)
    anything Placement.parse reads (layers:12, hot:16, cache:8GiB:lru, ...) is accepted as well, and any
    name may end in "+zN": the GPU computes up to N misses per layer itself from pinned RAM (0: the CPU).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

from hotexperts.bench.replay import RoutingReplay
from hotexperts.bench.workload import BenchTest, RoutingSource
from hotexperts.engine.cli_generate import add_compile_argument
from hotexperts.engine.engine import dense_bytes, kv_bytes
from hotexperts.engine.generate import Generator
from hotexperts.errors import HotExpertsError
from hotexperts.experts.budget import GiB
from hotexperts.experts.placement import Placement, build_executor

WORKSPACE_BYTES = 512 * 2**20       # activations, logits, staging slack counted against the budget
NAMED = ("gpu", "cpu-moe", "n-cpu-moe", "hot", "cache")


@dataclass
class PlacementResult:
    label: str
    placement: str
    budget_gib: float | None
    tests: dict = field(default_factory=dict)      # test -> {"median","min","max","runs"} tok/s
    peak_vram_gib: float | None = None
    hit_rate: float | None = None
    layer_hit: list | None = None
    swaps: int = 0
    bytes_moved: int = 0
    n_cpu_layers: int | None = None          # layer offload: MoE layers whose experts stayed on the CPU
    decode_tokens: int = 0                   # timed decode steps that hit_rate / swaps / bytes_moved cover
    trace_wraps: int = 0                     # times the replayed routing ran past its end and restarted
    baseline_vram_gib: float | None = None   # allocated before this placement (dense weights; more = a leak)
    cpu_ms_per_token: float | None = None    # CPU expert compute per timed decode token (worker / sync path)
    host_ms_per_token: float | None = None   # executor bookkeeping between steps (stats, policy, swaps)
    decode_mode: str | None = None           # "graph" (one CUDA graph per step), "piecewise" or "eager"
    gpu_misses: int | None = None            # worker decode: most misses per layer the GPU reads from RAM
    gpu_share: int | None = None             # ... taking one per this many misses of a layer
    gpu_miss_count: int | None = None        # misses the GPU computed from host memory (whole placement)
    error: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve(name: str, budget: int | None, lm, reserved: int, quant: str, policy: str | None) -> Placement:
    """A placement name (module doc), optionally suffixed "+zN": the GPU computes up to N misses per layer
    from host memory (--moe-gpu-misses N), e.g. "cache+z0" or "n-cpu-moe+z2"."""
    name, _, z = name.partition("+z")
    kw = {"vram_budget": budget, "expert_quant": quant, "gpu_misses": int(z) if z else None}
    if name == "gpu":
        return Placement("gpu", expert_quant=quant)
    if name == "cpu-moe":
        return Placement("cpu", **kw)
    if name == "n-cpu-moe":
        return Placement("layers", n_cpu_layers=None, **kw)
    if name == "hot":
        return Placement("hot", hot_k=_hot_k(lm, budget, reserved, quant), **kw)
    if name == "cache":
        return Placement("cache", policy=policy, **kw)
    return Placement.parse(name, **kw)


def _hot_k(lm, budget: int | None, reserved: int, quant: str) -> int:
    E, Lm = lm.cfg.num_experts, len(lm.store.layers)
    if budget is None:
        return E
    slot = _slot_bytes(lm, quant)
    staging = 2 * E * slot           # the two prompt staging pools (a layer's experts each), kept first
    free = budget - reserved - (staging if budget - reserved > staging else 0)
    return max(0, min(E, free // slot // Lm))


def _slot_bytes(lm, quant: str) -> int:
    from hotexperts.experts.placement import quantized_store

    return quantized_store(lm.store, quant).expert_nbytes


class Bench:
    """Runs the tests of one placement on a fresh executor; keeps the model and store shared."""

    def __init__(self, lm, device: torch.device, max_context: int, source: RoutingSource, seed: int = 0,
                 piecewise: bool = False, compile_decode: bool = False):
        self.lm, self.device, self.max_context, self.source = lm, device, max_context, source
        self.piecewise, self.compile_decode = piecewise, compile_decode
        g = torch.Generator().manual_seed(seed)
        hi = min(lm.cfg.vocab_size, 32000)
        self.tokens = torch.randint(100, hi, (max_context,), generator=g).tolist()

    def executor(self, placement: Placement, reserved: int):
        ex = build_executor(placement, self.lm.store, self.lm.cfg, self.device, reserved_bytes=reserved,
                            dtype=next(self.lm.model.parameters()).dtype)
        if self.source.trace is not None:
            ex = RoutingReplay(ex, self.source.trace, self.lm.cfg.moe_layers, self.device)
        return ex

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _seek(self, ex, position: int) -> None:
        if isinstance(ex, RoutingReplay):
            ex.seek(position)

    def run_test(self, gen: Generator, ex, test: BenchTest, decode: DecodeCounts | None = None) -> float:
        """One run of `test`; returns tokens/s. For tg tests, `decode` accumulates the cache counters of
        the timed decode steps only (prompt and warm-up excluded). Replayed routing is consumed in order
        across the tests (the cursor never rewinds within a placement), so no test decodes routing the
        cache has just seen in an earlier prompt."""
        with torch.no_grad():
            if test.kind == "pp":
                self._sync()
                t0 = time.perf_counter()
                gen.prefill(self.tokens[:test.n])
                self._sync()
                return test.n / (time.perf_counter() - t0)
            depth = max(test.depth, 1)
            logits = gen.prefill(self.tokens[:depth])
            token = int(logits.argmax())
            self._sync()
            before = _counters(ex)
            t0 = time.perf_counter()
            for i in range(test.n):
                token = int(gen.decode_one(token, depth + i).argmax())
            self._sync()
            tps = test.n / (time.perf_counter() - t0)
            if decode is not None and before is not None:
                decode.add(before, _counters(ex), test.n)
            return tps


@dataclass
class DecodeCounts:
    """Cache counters summed over timed decode steps: per layer hits/misses, swaps, bytes moved."""

    hits: list = field(default_factory=list)
    misses: list = field(default_factory=list)
    swaps: int = 0
    bytes_moved: int = 0
    cpu_s: float = 0.0
    host_s: float = 0.0
    tokens: int = 0

    def add(self, before: dict, after: dict, tokens: int) -> None:
        d = {k: [a - b for a, b in zip(after[k], before[k], strict=True)] for k in ("hits", "misses")}
        self.hits = [a + b for a, b in zip(self.hits or [0] * len(d["hits"]), d["hits"], strict=True)]
        self.misses = [a + b for a, b in zip(self.misses or [0] * len(d["misses"]), d["misses"], strict=True)]
        self.swaps += after["swaps"] - before["swaps"]
        self.bytes_moved += after["bytes_moved"] - before["bytes_moved"]
        self.cpu_s += after["cpu_s"] - before["cpu_s"]
        self.host_s += after["host_s"] - before["host_s"]
        self.tokens += tokens


def _counters(ex) -> dict | None:
    stats = ex.stats() if callable(getattr(ex, "stats", None)) else None
    if not stats:
        return None
    layers = list(stats["layers"].values())
    return {"hits": [v["hits"] for v in layers], "misses": [v["misses"] for v in layers],
            "swaps": stats["total"]["swaps"], "bytes_moved": stats["total"]["bytes_moved"],
            "cpu_s": stats["total"]["cpu_s"], "host_s": stats.get("host_s", 0.0)}


def tokens_needed(tests: list[BenchTest], repeats: int) -> int:
    """Trace rows one placement consumes (warm-up included): replay longer than this never wraps."""
    return 8 + WARMUP_PROMPT + repeats * sum(t.n + (max(t.depth, 1) if t.kind == "tg" else 0) for t in tests)


def summarize(runs: list[float]) -> dict:
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs}


def measure(bench: Bench, label: str, placement: Placement, budget: int | None, reserved: int,
            tests: list[BenchTest], repeats: int, progress=None) -> PlacementResult:
    res = PlacementResult(label, placement.describe(), None if budget is None else budget / GiB)
    gc.collect()                    # the previous placement's slot pools sit in reference cycles
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(bench.device)
        res.baseline_vram_gib = torch.cuda.memory_allocated(bench.device) / GiB
    ex = gen = None
    try:
        ex = bench.executor(placement, reserved)
        bench._seek(ex, 0)          # every placement replays the same routing, which runs forward through
        gen = Generator(bench.lm.model, ex, bench.lm.cfg, bench.device, bench.max_context,
                        piecewise_graph=bench.piecewise, compile_decode=bench.compile_decode)
        warm_up(bench, gen, ex)
        decode = DecodeCounts()
        for test in tests:
            runs = []
            for _ in range(repeats):
                runs.append(bench.run_test(gen, ex, test, decode))
                if progress:
                    progress(f"{label} {test.name}: {runs[-1]:.1f} tok/s")
            res.tests[test.name] = summarize(runs)
        _decode_stats(res, decode)
        res.trace_wraps = ex.wraps if isinstance(ex, RoutingReplay) else 0
        res.n_cpu_layers = _cpu_layers(ex, bench.lm)
        res.decode_mode = _decode_mode(gen)
        _worker_stats(res, ex)
    except (HotExpertsError, torch.cuda.OutOfMemoryError, RuntimeError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if bench.device.type == "cuda":
            res.peak_vram_gib = torch.cuda.max_memory_allocated(bench.device) / GiB
        close = getattr(ex, "close", None)
        if close is not None:
            close()                 # stop the placement's CPU worker thread now, not at collection
        ex = gen = None
    return res


WARMUP_PROMPT = 128                  # tokens: over the default --moe-pp-bypass, so the streamed path runs


def warm_up(bench: Bench, gen: Generator, ex) -> None:
    """As llama-bench, one untimed prompt and a few decode steps first: graphs captured, kernels compiled,
    the prompt cost measured, and the cache seeded by that prompt (its fills waited for). The timed tests
    then see the steady state a user sees after a first request, not the load-time placeholders."""
    bench.run_test(gen, ex, BenchTest("warmup", "pp", WARMUP_PROMPT))
    bench.run_test(gen, ex, BenchTest("warmup", "tg", 4))
    slots = getattr(ex, "slots", None)
    if slots is not None:
        slots.wait_all()


def _worker_stats(res: PlacementResult, ex) -> None:
    stats = ex.stats() if callable(getattr(ex, "stats", None)) else None
    worker = getattr(ex, "worker", None)
    if stats and worker is not None:
        res.gpu_misses, res.gpu_miss_count = stats.get("gpu_misses"), stats.get("gpu_miss_count")
        res.gpu_share = getattr(worker, "share", None)


def _decode_mode(gen: Generator) -> str:
    step = gen.decode_step
    if not getattr(step, "graphed", False):
        return "eager"
    return "piecewise" if type(step).__name__ == "PiecewiseDecodeStep" else "graph"


def _cpu_layers(ex, lm) -> int | None:
    """MoE layers with no expert resident on the GPU (what --n-cpu-moe counts), for hybrid executors."""
    slots = getattr(ex, "slots", None)
    if getattr(ex, "controller", None) is not None or not hasattr(ex, "slots"):
        return None
    if slots is None:
        return len(lm.store.layers)
    return sum(1 for l in lm.store.layers if l not in slots.layers or slots.resident_count(l) == 0)


def _decode_stats(res: PlacementResult, d: DecodeCounts) -> None:
    """Hit rate, swaps and bytes moved over the timed decode steps (what tg tok/s was measured on)."""
    if not d.tokens or not d.hits:
        return
    n = sum(d.hits) + sum(d.misses)
    res.hit_rate = sum(d.hits) / n if n else None
    res.layer_hit = [h / max(1, h + m) for h, m in zip(d.hits, d.misses, strict=True)]
    res.swaps, res.bytes_moved, res.decode_tokens = d.swaps, d.bytes_moved, d.tokens
    res.cpu_ms_per_token = 1e3 * d.cpu_s / d.tokens
    res.host_ms_per_token = 1e3 * d.host_s / d.tokens


def run_bench(lm, placements: list[str], budgets: list[float | None], tests: list[BenchTest], repeats: int,
              source: RoutingSource, device: torch.device, *, quant: str = "none", policy: str | None = None,
              progress=None, labels: list[str] | None = None, piecewise: bool = False,
              compile_decode: bool = False) -> dict:
    max_context = max(max(t.context_needed for t in tests), WARMUP_PROMPT + 1) + 8
    dtype = next(lm.model.parameters()).dtype
    reserved = dense_bytes(lm.model) + kv_bytes(lm.cfg, max_context, dtype) + WORKSPACE_BYTES
    bench = Bench(lm, device, max_context, source, piecewise=piecewise, compile_decode=compile_decode)
    results = []
    for bi, b in enumerate(budgets):
        budget = None if b is None else int(b * GiB)
        for name, label in zip(placements, labels or placements, strict=True):
            if name == "gpu" and bi > 0:
                continue                                   # the reference ignores the budget: run it once
            p = resolve(name, budget, lm, reserved, quant, policy)
            results.append(measure(bench, label, p, None if name == "gpu" else budget, reserved, tests,
                                   repeats, progress).to_dict())
    return {"model": lm.cfg.model_type, "routing": source.name, "routing_kind": source.kind,
            "piecewise_graph": piecewise, "compile_decode": compile_decode,
            "tests": [t.name for t in tests], "repeats": repeats, "device": _device_name(device),
            "reserved_gib": reserved / GiB, "expert_quant": quant, "results": results,
            "expert_format": expert_format(lm.store, quant), "distinct_experts": _distinct(source, lm.cfg)}


def expert_format(store, quant: str = "none") -> str:
    """The experts' format as benchmarked: --expert-quant when it re-quantizes, else the store's own
    (e.g. "int4g32" for Q4_K GGUF experts; "int4g32 + bf16 down" when w13 and w2 differ)."""
    if quant not in (None, "none"):
        return quant
    le = store.layer(store.layers[0])
    f13, f2 = (getattr(w, "fmt", None) or str(w.dtype).removeprefix("torch.") for w in (le.w13, le.w2))
    return f13 if f13 == f2 else f"{f13} + {f2} down"


def _distinct(source: RoutingSource, cfg) -> dict | None:
    """Distinct experts used per MoE layer by the replayed routing (the report must show it)."""
    if source.trace is None:
        return None
    import numpy as np

    ids = np.asarray(source.trace.ids)
    per_layer = [int(len(np.unique(ids[:, i][ids[:, i] >= 0]))) for i in range(ids.shape[1])]
    return {"min": min(per_layer), "median": float(np.median(per_layer)), "max": max(per_layer),
            "of": cfg.num_experts}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---- command line ------------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="placements side by side at one VRAM budget (llama-bench style)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="preset:qwen3-30b-a3b-mini", help="HF dir or preset:NAME")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) | float32 (default on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--placements", default=",".join(NAMED), help=f"comma list (default {','.join(NAMED)})")
    p.add_argument("--vram-budget", default=None, metavar="GiB[,GiB...]",
                   help="budgets to compare at (e.g. 16,24); default: unlimited")
    p.add_argument("--tests", default="pp512,tg128",
                   help="ppN, tgN, tgN@dD (e.g. pp512,pp4096,tg128,tg128@d4096)")
    p.add_argument("--repeats", type=int, default=3)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--route-trace", metavar="FILE",
                     help="replay routing from a trace (.npz or a shared raw file)")
    src.add_argument("--route-synthetic", metavar="PRESET", help="replay calibrated synthetic routing")
    p.add_argument("--route-tokens", type=int, default=None,
                   help="synthetic routing length (default: what one placement consumes: it never wraps)")
    p.add_argument("--expert-quant", default="none", choices=("none", "int8", "int4", "int8g"))
    p.add_argument("--policy", default=None, help="policy of the 'cache' placement (default auto)")
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--plots", default=None, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--piecewise-graph", action="store_true",
                   help="experimental: CUDA graphs around the hybrid cache's per-layer host work")
    add_compile_argument(p)
    p.add_argument("--predict", default=None, metavar="PROFILE",
                   help="CPU-only machines: run the cache with the slot counts the real shape gets at each "
                        "budget on this hardware profile and print the cost model's PREDICTED speeds "
                        "(default on a machine without CUDA: rtx4090-7950x)")


def run(args) -> int:
    from hotexperts.bench import report as rep
    from hotexperts.bench.workload import parse_tests, routing_source
    from hotexperts.engine.engine import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tests = parse_tests(args.tests)
    budgets = [None] if not args.vram_budget else [float(b) for b in str(args.vram_budget).split(",")]
    lm = _load_quantized(args.model, dtype, device, args.seed, args.expert_quant)
    kind, arg = ("trace", args.route_trace) if args.route_trace else (
        ("synthetic", args.route_synthetic) if args.route_synthetic else ("router", None))
    needed = tokens_needed(tests, args.repeats)
    source = routing_source(kind, arg, lm.cfg, num_tokens=args.route_tokens or needed, seed=args.seed)
    if kind == "router":
        print("note: routing comes from the model's own router; random weights make it unrealistic "
              "(use --route-trace or --route-synthetic for speed claims)")
    names = [s.strip() for s in args.placements.split(",") if s.strip()]
    progress = lambda msg: print("  " + msg, flush=True)  # noqa: E731
    profile = args.predict or (None if device.type == "cuda" else "rtx4090-7950x")
    if profile is not None:
        return _run_predicted(args, lm, names, budgets, tests, source, device, profile, progress)
    report = run_bench(lm, names, budgets, tests, args.repeats, source, device, quant=args.expert_quant,
                       policy=args.policy, progress=progress, piecewise=args.piecewise_graph,
                       compile_decode=args.compile)
    print()
    print(rep.table(report))
    if args.json:
        print(f"JSON: {rep.save_json(report, args.json)}")
    if args.plots:
        for path in rep.plots(report, args.plots):
            print(f"plot: {path}")
    return 0


def _load_quantized(source: str, dtype, device, seed: int, quant: str):
    """The model with its experts in the bench's format, quantized once (a preset is built that way
    directly: no bf16 copy of a 30B model's experts in RAM), not once per placement."""
    from hotexperts.engine.engine import PRESET_PREFIX, load_source
    from hotexperts.experts.placement import QUANT, quantized_store

    if QUANT.get(quant) and source.startswith(PRESET_PREFIX):
        from hotexperts.engine.presets import build_in_memory

        return build_in_memory(source[len(PRESET_PREFIX):], dtype=dtype, device=device, seed=seed,
                               expert_dtype=QUANT[quant])
    lm = load_source(source, dtype, device, seed)
    lm.store = quantized_store(lm.store, quant)
    return lm


def _run_predicted(args, lm, names, budgets, tests, source, device, profile: str, progress) -> int:
    """CPU-only: real cache behaviour on the mini model, predicted speeds for the real shape (labelled)."""
    from hotexperts.bench import predict as pr
    from hotexperts.bench import report as rep
    from hotexperts.errors import HotExpertsError
    from hotexperts.trace.profiles import get_profile

    shape = pr.shape_for(args.model, args.expert_quant)
    if shape is None:
        raise HotExpertsError("--predict needs a model with a known real shape (e.g. "
                              f"preset:qwen3-30b-a3b-mini); "
                              f"{args.model!r} has none")
    hw = get_profile(profile)
    budgets = [b if b is not None else hw.vram_gb for b in budgets]
    out = {"predicted": [], "measured_on_this_machine": []}
    for b in budgets:
        plan = pr.real_plan(shape, b)
        report = run_bench(lm, pr.placements_for(plan, names), [None], tests, args.repeats, source, device,
                           quant=args.expert_quant, policy=args.policy, progress=progress, labels=names,
                           compile_decode=args.compile)
        rows = pr.predictions(report, shape, hw, plan)
        print()
        print(pr.table(rows, shape, hw, plan))
        print(f"\n(measured here, tiny widths, {report['device']}: cache behaviour is real, speeds are not "
              f"those of the real model)\n")
        print(rep.table(report))
        out["predicted"].append({"plan": plan, "rows": rows})
        out["measured_on_this_machine"].append(report)
    if args.json:
        print(f"JSON: {rep.save_json(out | {'profile': hw.to_dict(), 'shape': shape.name}, args.json)}")
    return 0
