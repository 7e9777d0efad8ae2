"""The side-by-side benchmark: several placements, one process, one model, the same VRAM budget.

    report = run_bench(lm, placements=["gpu", "cpu-moe", "n-cpu-moe", "hot", "cache"], budgets=[16 GiB],
                       tests=parse_tests("pp512,tg128"), repeats=3, source=routing_source(...))
Each (budget, placement) gets an Engine over the SAME loaded model (Engine.from_loaded: the facade the CLI
and the server use), runs every test `repeats` times (median, min, max) and records peak VRAM (torch's
allocator peak, dense weights included), the solved plan (experts/solve.py: the same solver the engine
uses) and the cache's hit rate. Placements are texts of the placement grammar (experts/placement.py):
    gpu         every expert in VRAM (the reference; ignores the budget, reported as such)
    cpu-moe     every routed expert on the CPU (llama.cpp --cpu-moe)
    n-cpu-moe   layer offload: the smallest N of CPU layers (the most GPU layers) that fits the budget
    hot         the seed's design: K slots per layer (K = what the budget leaves / MoE layers), WindowLFU
    cache       one slot budget shared by all layers, adaptive policy (--policy to change)
    and anything else the grammar reads (layers:12, hot:16, cache:8GiB:lru, 0-11=cpu,12-47=gpu, ...); any
    may end in "+zN": the GPU computes up to N misses per layer itself from pinned RAM (0: the CPU).
With verify_ts (`--verify-t 1,2,4,8`) each placement also times T-token verify steps against 1-token steps
(bench/verify.py: speculative decoding's cost, as speed per accepted tokens per step).
With parallel_ns (`--parallel 1,2,4,8`) each placement's engine gets max(parallel_ns) sequence slots (their
KV cache reserved in its VRAM budget) and also runs the concurrency test (bench/concurrency.py: aggregate and
per-request tok/s with N requests batched into one decode step); the other tests use slot 0 as before.
"""

from __future__ import annotations

import gc
import platform
import statistics
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from hotexperts.bench.concurrency import concurrency
from hotexperts.bench.concurrency import context_needed as concurrency_context
from hotexperts.bench.replay import RoutingReplay
from hotexperts.bench.verify import context_needed as verify_context
from hotexperts.bench.verify import verify_cost
from hotexperts.bench.workload import BenchTest, RoutingSource
from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.engine.engine import Engine, cublas_for_budget, vram_reserved
from hotexperts.errors import HotExpertsError
from hotexperts.experts.budget import GiB
from hotexperts.experts.placement import Placement

NAMED = ("gpu", "cpu-moe", "n-cpu-moe", "hot", "cache")


@dataclass
class PlacementResult:
    label: str
    placement: str
    budget_gib: float | None
    plan: str | None = None                        # the solved plan (PlacementPlan.text())
    vram_plan_gib: dict | None = None              # its VRAM breakdown (context, dense, kv, workspace,
                                                   # staging, slots; total None = no budget)
    staging: str | None = None                     # the plan's prompt staging (pools x experts, or why none)
    dequant_chunk: int | None = None               # experts a quantized prompt batch dequantizes at a time
    prefill_chunk: int | None = None               # the prompt chunk the engine runs (and planned for)
    plan_notes: list | None = None                 # the engine's choices around the plan (chunk, cuBLAS)
    window: list | None = None                     # [start, end] unix s: per-placement nvidia-smi peaks
    tests: dict = field(default_factory=dict)      # test -> {"median","min","max","runs"} tok/s
    peak_vram_gib: float | None = None
    peak_process_gib: float | None = None     # CUDA context + torch's reserved peak (~ nvidia-smi's)
    context_after_gib: float | None = None    # device used - torch reserved after the tests (the context
                                              # measured again: cuBLAS handles, Triton modules, graphs)
    allocator_slack_gib: float | None = None  # torch's reserved peak - allocated peak (the plan's slack)
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
    verify: dict | None = None               # --verify-t: the T-token verify step's cost (bench/verify.py)
    concurrency: dict | None = None          # --parallel: batched decode throughput (bench/concurrency.py)
    error: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve(name: str, budget: int | None, quant: str, policy: str | None) -> Placement:
    """A placement name (module doc) at this budget; "gpu" ignores the budget; `policy` applies to the
    cache placements that name none."""
    p = Placement.parse(name)
    kw = {"vram_budget": None if p.mode == "gpu" else budget, "expert_quant": quant}
    if policy is not None and p.mode == "cache" and p.policy is None:
        kw["policy"] = policy
    return replace(p, **kw)


class Bench:
    """Runs the tests of one placement on a fresh Engine; keeps the loaded model and store shared."""

    def __init__(self, lm, device: torch.device, max_context: int, source: RoutingSource, seed: int = 0,
                 piecewise: bool = False, compile_decode: bool = False,
                 options: KernelOptions = DEFAULT_KERNELS, parallel: int = 1, verify_tokens: int = 0):
        self.lm, self.device, self.max_context, self.source = lm, device, max_context, source
        self.parallel = parallel                          # sequence slots of every placement's engine
        self.verify_tokens = verify_tokens                # the longest verify step the plans make room for
        self.piecewise, self.compile_decode, self.options = piecewise, compile_decode, options
        dtype = next(lm.model.parameters()).dtype
        self.context = vram_reserved(lm, max_context, dtype, device).get("context", 0)   # CUDA context
        g = torch.Generator().manual_seed(seed)
        hi = min(lm.cfg.vocab_size, 32000)
        self.tokens = torch.randint(100, hi, (max_context,), generator=g).tolist()

    def engine(self, placement: Placement) -> Engine:
        """The placement's engine over the shared model; replayed routing wraps its executor."""
        engine = Engine.from_loaded(self.lm, self.device, placement, max_context=self.max_context,
                                    piecewise_graph=self.piecewise, compile_decode=self.compile_decode,
                                    kernel_options=self.options, parallel=self.parallel,
                                    verify_tokens=self.verify_tokens, wrap_executor=self._replay)
        if isinstance(engine.executor, RoutingReplay):
            engine.executor.seek(0)  # every placement replays the same routing, forward through the tests
        return engine

    def _replay(self, ex):
        if self.source.trace is None:
            return ex
        return RoutingReplay(ex, self.source.trace, self.lm.cfg.moe_layers, self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run_test(self, engine: Engine, test: BenchTest, decode: DecodeCounts | None = None) -> float:
        """One run of `test`; returns tokens/s. For tg tests, `decode` accumulates the cache counters of
        the timed decode steps only (prompt and warm-up excluded). Replayed routing is consumed in order
        across the tests (the cursor never rewinds within a placement), so no test decodes routing the
        cache has just seen in an earlier prompt."""
        with torch.no_grad():
            if test.kind == "pp":
                self._sync()
                t0 = time.perf_counter()
                engine.prefill(self.tokens[:test.n])
                self._sync()
                return test.n / (time.perf_counter() - t0)
            depth = max(test.depth, 1)
            token = int(engine.prefill(self.tokens[:depth]).argmax())
            self._sync()
            before = _counters(engine.executor)
            t0 = time.perf_counter()
            for i in range(test.n):
                token = int(engine.decode_one(token, depth + i).argmax())
            self._sync()
            tps = test.n / (time.perf_counter() - t0)
            if decode is not None and before is not None:
                decode.add(before, _counters(engine.executor), test.n)
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
    stats = ex.stats()
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


def measure(bench: Bench, label: str, placement: Placement, budget: int | None,
            tests: list[BenchTest], repeats: int, progress=None,
            verify_ts: list[int] = (), parallel_ns: list[int] = ()) -> PlacementResult:
    res = PlacementResult(label, placement.describe(), None if budget is None else budget / GiB)
    start = time.time()
    gc.collect()                    # the previous placement's slot pools sit in reference cycles
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(bench.device)
        res.baseline_vram_gib = torch.cuda.memory_allocated(bench.device) / GiB
    engine = None
    try:
        engine = bench.engine(placement)
        ex = engine.executor
        _plan_stats(res, ex.plan)
        res.prefill_chunk = engine.generator.prefill_chunk
        warm_up(bench, engine)
        decode = DecodeCounts()
        for test in tests:
            runs = []
            for _ in range(repeats):
                runs.append(bench.run_test(engine, test, decode))
                if progress:
                    progress(f"{label} {test.name}: {runs[-1]:.1f} tok/s")
            res.tests[test.name] = summarize(runs)
        _decode_stats(res, decode)
        if verify_ts:
            res.verify = _verify(bench, engine, verify_ts, repeats, progress, label)
        if parallel_ns:
            res.concurrency = _concurrency(bench, engine, parallel_ns, repeats, progress, label)
        res.trace_wraps = ex.wraps if isinstance(ex, RoutingReplay) else 0
        res.n_cpu_layers = _cpu_layers(ex)
        res.decode_mode = _decode_mode(engine)
        _worker_stats(res, ex.stats())
    except (HotExpertsError, torch.cuda.OutOfMemoryError, RuntimeError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if bench.device.type == "cuda":
            _measured_vram(res, bench)
        if engine is not None:
            engine.close()          # stop the placement's CPU worker thread now, not at collection
        engine = None
        res.window = [round(start, 2), round(time.time(), 2)]
    return res


WARMUP_PROMPT = 128                  # tokens: over the default --moe-pp-bypass, so the streamed path runs


def warm_up(bench: Bench, engine: Engine) -> None:
    """As llama-bench, one untimed prompt and a few decode steps first: graphs captured, kernels compiled,
    the prompt cost measured, and the cache seeded by that prompt (its fills waited for). The timed tests
    then see the steady state a user sees after a first request, not the load-time placeholders."""
    bench.run_test(engine, BenchTest("warmup", "pp", WARMUP_PROMPT))
    bench.run_test(engine, BenchTest("warmup", "tg", 4))
    engine.executor.wait_for_fills()


def _verify(bench: Bench, engine: Engine, ts: list[int], repeats: int, progress, label: str) -> dict:
    trace = bench.source.trace
    v = verify_cost(engine, bench.tokens, ts, repeats=repeats, sync=bench._sync,
                    trace_ids=None if trace is None else np.asarray(trace.ids))
    if progress:
        progress(f"{label} verify: " + ", ".join(f"T={r['T']} {r['cost_vs_1']:.2f}x" for r in v["rows"]))
    return v


def _concurrency(bench: Bench, engine: Engine, ns: list[int], repeats: int, progress, label: str) -> dict:
    c = concurrency(engine, bench.tokens, ns, repeats=repeats, sync=bench._sync)
    if progress:
        rows = (f"N={r['N']} {r['aggregate_tok_per_s']:.1f} tok/s ({r['vs_one_request']:.2f}x)"
                for r in c["rows"])
        progress(f"{label} concurrency: " + ", ".join(rows))
    return c


def _plan_stats(res: PlacementResult, plan) -> None:
    if plan is not None:
        res.plan = plan.text()
        res.vram_plan_gib = {k: None if v is None else v / GiB for k, v in plan.vram.items()} or None
        res.staging, res.dequant_chunk = plan.staging.describe(), plan.dequant_chunk
        res.plan_notes = list(plan.notes) or None


def _measured_vram(res: PlacementResult, bench: Bench) -> None:
    """What the device measured for this placement (CUDA): torch's peaks, the process peak with the
    context measured at the bench's start, the context measured again now, and the allocator's slack."""
    dev = bench.device
    allocated, reserved = torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)
    free, total = torch.cuda.mem_get_info(dev)
    res.peak_vram_gib = allocated / GiB
    res.peak_process_gib = (bench.context + reserved) / GiB
    res.context_after_gib = max(0, total - free - torch.cuda.memory_reserved(dev)) / GiB
    res.allocator_slack_gib = (reserved - allocated) / GiB


def _worker_stats(res: PlacementResult, stats: dict | None) -> None:
    if stats and stats.get("decode") == "worker":
        res.gpu_misses, res.gpu_miss_count = stats.get("gpu_misses"), stats.get("gpu_miss_count")
        res.gpu_share = stats.get("gpu_share")


def _decode_mode(engine: Engine) -> str:
    step = engine.generator.decode_step
    if not step.graphed:
        return "eager"
    return "piecewise" if type(step).__name__ == "PiecewiseDecodeStep" else "graph"


def _cpu_layers(ex) -> int | None:
    """MoE layers with no expert resident on the GPU (what --n-cpu-moe counts), for layer offload plans
    (no policy); None for caches and the all-GPU placement."""
    plan = ex.plan
    if plan is None or plan.dense or plan.managed:
        return None
    slots = ex.slots
    if slots is None:
        return len(plan.where)
    return sum(1 for l in plan.where if l not in slots.layers or slots.resident_count(l) == 0)


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
              compile_decode: bool = False, options: KernelOptions = DEFAULT_KERNELS,
              checkpoint=None, verify_ts: list[int] = (), parallel_ns: list[int] = ()) -> dict:
    """checkpoint(report): called with the report so far after each placement (a run cut short keeps
    what it measured). verify_ts: also time T-token verify steps for these T (bench/verify.py);
    parallel_ns: also run the concurrency test for these N (bench/concurrency.py)."""
    max_context = max(max(t.context_needed for t in tests), WARMUP_PROMPT + 1,
                      verify_context(verify_ts, repeats=repeats) if verify_ts else 0,
                      concurrency_context(parallel_ns, repeats=repeats) if parallel_ns else 0) + 8
    dtype = next(lm.model.parameters()).dtype
    parallel, verify = max(parallel_ns, default=1), max(verify_ts, default=0)
    tightest = min((b for b in budgets if b is not None), default=None)
    if tightest is not None:          # before the first matmul: CUBLAS_WORKSPACE_CONFIG is read once
        tight = Placement(vram_budget=int(tightest * GiB), expert_quant=quant)
        cublas_for_budget(lm, tight, max_context, dtype, device, parallel=parallel, verify_tokens=verify,
                          graphs=device.type == "cuda", expert_quant=quant)
    reserved = sum(vram_reserved(lm, max_context, dtype, device, parallel=parallel).values())
    bench = Bench(lm, device, max_context, source, piecewise=piecewise, compile_decode=compile_decode,
                  options=options, parallel=parallel, verify_tokens=verify)
    results = []
    fmt, distinct = expert_format(lm.store, quant), _distinct(source, lm.cfg)      # once, not per checkpoint

    def report() -> dict:
        return {"model": lm.cfg.model_type, "routing": source.name, "routing_kind": source.kind,
                "piecewise_graph": piecewise, "compile_decode": compile_decode,
                "tests": [t.name for t in tests], "repeats": repeats, "device": _device_name(device),
                "reserved_gib": reserved / GiB, "expert_quant": quant, "results": list(results),
                "expert_format": fmt, "distinct_experts": distinct, "parallel_slots": parallel}

    for bi, b in enumerate(budgets):
        budget = None if b is None else int(b * GiB)
        for name, label in zip(placements, labels or placements, strict=True):
            if name == "gpu" and bi > 0:
                continue                                   # the reference ignores the budget: run it once
            p = resolve(name, budget, quant, policy)
            results.append(measure(bench, label, p, p.vram_budget, tests, repeats, progress,
                                   verify_ts, parallel_ns).to_dict())
            if checkpoint is not None:
                checkpoint(report())
    return report()


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
    ids = np.asarray(source.trace.ids)
    per_layer = [int(len(np.unique(ids[:, i][ids[:, i] >= 0]))) for i in range(ids.shape[1])]
    return {"min": min(per_layer), "median": float(np.median(per_layer)), "max": max(per_layer),
            "of": cfg.num_experts}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
