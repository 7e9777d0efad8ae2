"""`hotexperts calibrate [--out profile.json] [--bench BENCH.json ...]`: measure this machine into a profile.

Measured (medians of a few repeats, torch):
    cpu_read_gbs        sum over a large float32 tensor (bytes read / s)
    cpu_call_s, cpu_expert_gbs   per expert format (bf16, int8, int4): one fused CPU MoE call
                        (hotexperts.kernels.cpu_moe, the kernel the decode worker runs) with 1 and with 8
                        experts of Qwen3-30B-A3B shape drawn from a stack larger than the last-level cache,
                        each call after a pause of --gap-us (decode calls come one per layer, not back to
                        back); the line t(n) = cpu_call_s + n * expert bytes / cpu_expert_gbs through them
                        (cpu_call_s from the first format measured)
    cpu_tflops          bf16 matmul of a prompt-sized batch
  with CUDA:
    h2d_gbs             pinned host -> device copy of --h2d-mib
    sync_s              per-layer round trip of the synchronous path: D2H of ids + activations, sync, H2D
    gpu_hbm_gbs         device-to-device copy (read + write counted)
    gpu_tflops          bf16 matmul 4096^3
    gpu_layer_overhead_s  10 tiny kernel launches (a decoder layer's eager launches: prompt batches)
    gpu_moe_launch_s, gpu_expert_gbs[int4]   the slot kernel of one decode layer (int4 slots, Qwen3 shape)
                        over 1 and 8 experts, CUDA-graph replay of 16 layers' calls: the line through them
    post_s, handoff_s   the decode mailbox (experts/mailbox.py, the engine's post / collect kernels and its
                        native CPU worker) graphed over 16 layers: no miss (post + collect) and one miss per
                        layer (minus the worker's own compute time: the handoff)
    gpu_host_read_s     the GPU computing one int4 expert straight from pinned host memory (UVA), graphed:
                        the part beyond its bytes / h2d_gbs
  with --bench BENCH.json (a `hotexperts bench --json` report of this machine; repeatable): the decode terms
  no kernel measures alone (gpu_layer_s, post_s, host_step_s, host_policy_s[...]) and the CPU call line are
  fitted on its placements (hotexperts/trace/fit.py; every row with a tg measurement; the engine is the
  engine.json beside the report if an older engine made it, else current; --engine overrides).
Figures not measured here are kept from --base (a built-in profile); `sources` records what each came from.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from hotexperts.errors import HotExpertsError
from hotexperts.experts.mailbox import DecodeHandoff
from hotexperts.experts.store import ExpertStore, pin_weight
from hotexperts.formats import EXPERT_QUANT
from hotexperts.kernels.cpu_moe import cpu_moe
from hotexperts.kernels.gpu_moe import gpu_moe
from hotexperts.quant import quantize_layer
from hotexperts.trace import fit as F
from hotexperts.trace.costmodel import default_policy
from hotexperts.trace.profiles import BUILTIN, HardwareProfile, save_hardware
from hotexperts.trace.real_shape import shape_for
from hotexperts.weights import LayerExperts

QWEN_D, QWEN_I, QWEN_K = 2048, 768, 8
CALL_SIZES = (1, 8)


def _median_s(fn, repeats: int = 5, sync=None, before=None) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if before:
            before()
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def line_fit(points: dict) -> tuple[float, float]:
    """{n: seconds} for two or more n -> (intercept, slope) of the least-squares line t = a + b n."""
    ns, ts = list(points), [points[n] for n in points]
    if len(ns) < 2:
        raise ValueError("a line needs two sizes")
    mn, mt = sum(ns) / len(ns), sum(ts) / len(ts)
    b = sum((n - mn) * (t - mt) for n, t in zip(ns, ts, strict=True)) / sum((n - mn) ** 2 for n in ns)
    return mt - b * mn, b


def call_terms(points: dict, expert_bytes: float) -> tuple[float, float]:
    """Call times {experts: s} -> (fixed seconds per call >= 0, GB/s of weights per added expert)."""
    a, b = line_fit(points)
    if b <= 0:
        raise ValueError(f"call time does not grow with experts ({points}): measure over more memory")
    return max(0.0, a), expert_bytes / b / 1e9


def cpu_read_gbs(mib: int) -> float:
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    return x.numel() * 4 / _median_s(lambda: x.sum()) / 1e9


def _experts(fmt: str, num: int, d: int, inter: int):
    w13 = torch.randn(num, 2 * inter, d, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(num, d, inter, dtype=torch.bfloat16) * 0.02
    layer = LayerExperts(w13, w2)
    if fmt == "bf16":
        return layer
    return quantize_layer(layer, EXPERT_QUANT[fmt])


def _nbytes(w) -> int:
    return w.nbytes if hasattr(w, "fmt") else w.numel() * w.element_size()


def cpu_call_times(fmt: str, mib: int, d: int = QWEN_D, inter: int = QWEN_I, sizes=CALL_SIZES,
                   gap_s: float = 300e-6, repeats: int = 15) -> tuple[dict, float]:
    """-> ({experts per call: median seconds}, bytes per expert): fused CPU MoE calls with random experts of
    a stack of about `mib` MiB, one token, each call after a pause of gap_s (the CPU idles between a decode
    step's layers, and a call that follows a pause is what the worker runs)."""
    per = 3 * d * inter * {"bf16": 2, "int8": 1, "int4": 0.5}[fmt]
    num = max(max(sizes), int(mib * 2**20 // per))
    layer = _experts(fmt, num, d, inter)
    per_expert = (_nbytes(layer.w13) + _nbytes(layer.w2)) / num
    x = torch.randn(1, d, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    out = torch.empty(1, d, dtype=torch.bfloat16)
    times = {}
    for k in sizes:
        draws = [torch.randperm(num, generator=gen)[:k].view(1, k) for _ in range(16)]
        w = torch.full((1, k), 1.0 / k, dtype=torch.bfloat16)
        it = iter(range(1 << 30))

        def step(draws=draws, w=w, it=it):
            cpu_moe(x, draws[next(it) % len(draws)], w, layer, out)

        times[k] = _median_s(step, repeats=repeats, before=(lambda: time.sleep(gap_s)) if gap_s else None)
    return times, per_expert


def cpu_tflops(n: int = 512, d: int = 2048) -> float:
    """Best of bf16 (fast with AMX / AVX-512 BF16) and fp32 (fast elsewhere) matmul throughput."""
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, d, dtype=dtype), torch.randn(d, d, dtype=dtype)
        best = max(best, 2 * n * d * d / _median_s(lambda a=a, b=b: a @ b, repeats=3) / 1e12)
    return best


def cuda_figures(h2d_mib: int) -> dict:
    dev, sync = torch.device("cuda"), torch.cuda.synchronize
    host = torch.empty(h2d_mib * 2**20, dtype=torch.uint8).pin_memory()
    gpu = torch.empty_like(host, device=dev)
    h2d = host.numel() / _median_s(lambda: gpu.copy_(host, non_blocking=True), sync=sync) / 1e9
    hbm = 2 * gpu.numel() / _median_s(lambda: gpu.clone(), sync=sync) / 1e9
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=dev)
    tflops = 2 * 4096**3 / _median_s(lambda: a @ a, sync=sync) / 1e12
    x = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
    ids = torch.zeros(1, 8, dtype=torch.int64, device=dev)
    px, pids = x.cpu().pin_memory(), ids.cpu().pin_memory()

    def round_trip():
        px.copy_(x, non_blocking=True)
        pids.copy_(ids, non_blocking=True)
        sync()
        x.copy_(px, non_blocking=True)
        x.add_(1)

    sync_s = _median_s(round_trip, repeats=50, sync=sync)
    small = torch.zeros(16, device=dev)
    launch = _median_s(lambda: [small.add_(1) for _ in range(100)], sync=sync) / 100
    vram = torch.cuda.get_device_properties(dev).total_memory / 1e9
    return dict(h2d_gbs=h2d, gpu_hbm_gbs=hbm, gpu_tflops=tflops, sync_s=sync_s,
                gpu_layer_overhead_s=10 * launch, vram_gb=vram)


# ---- graphed worker decode terms (CUDA) --------------------------------------------------------------
class CudaDecodeBench:
    """The engine's decode kernels timed under CUDA-graph replay (Qwen3-30B-A3B shape, int4g32 experts).
    Each method returns seconds per layer call; `layers` calls with different experts per graph."""
    def __init__(self, layers: int = 16, slots: int = 128, repeats: int = 20):

        self.dev, self.L, self.repeats = torch.device("cuda"), layers, repeats
        D, I = QWEN_D, QWEN_I
        g = torch.Generator().manual_seed(0)
        host = quantize_layer(LayerExperts(torch.randn(slots, 2 * I, D, generator=g) * 0.02,
                                           torch.randn(slots, D, I, generator=g) * 0.02), "int4g32")
        self.host = LayerExperts(host.w13.to("cpu"), host.w2.to("cpu"))
        self.pinned = LayerExperts(_pin(host.w13), _pin(host.w2))
        self.slots = LayerExperts(host.w13.to(self.dev), host.w2.to(self.dev))
        self.expert_bytes = (_nbytes(host.w13) + _nbytes(host.w2)) / slots
        self.E = slots
        self.x = torch.randn(1, D, dtype=torch.bfloat16, device=self.dev)
        self.gen = torch.Generator().manual_seed(1)

    def _ids(self, k: int, n: int | None = None) -> list[torch.Tensor]:
        n = n or self.E
        return [torch.randperm(n, generator=self.gen)[:k].view(1, k).to(self.dev) for _ in range(self.L)]

    def _graphed(self, body) -> float:
        s = torch.cuda.Stream(self.dev)
        s.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(s):
            body()                                                  # warm-up (compiles, allocates)
        torch.cuda.current_stream(self.dev).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return _median_s(graph.replay, repeats=self.repeats, sync=torch.cuda.synchronize) / self.L

    def slot_kernel(self, k: int) -> float:
        ids = self._ids(k)
        w = torch.full((1, k), 1.0 / k, dtype=torch.bfloat16, device=self.dev)
        out = torch.empty_like(self.x)

        def body():
            for i in ids:
                gpu_moe(self.x, i, w, self.slots.w13, self.slots.w2, None, out=out)
        return self._graphed(body)

    def host_read(self, k: int) -> float:
        from hotexperts.kernels.triton_moe import moe_decode  # Triton: imported only on CUDA
        ids = self._ids(k)
        w = torch.full((1, k), 1.0 / k, dtype=torch.bfloat16, device=self.dev)
        out = torch.empty(1, QWEN_D, dtype=torch.float32, device=self.dev)

        def body():
            for i in ids:
                moe_decode(self.x, i, w, self.pinned.w13, self.pinned.w2, None, out)
        return self._graphed(body)

    def mailbox(self, miss: bool) -> tuple[float, float]:
        """-> (seconds per layer of post + collect, CPU worker compute seconds per layer)."""

        store = ExpertStore({l: self.host for l in range(self.L)})       # the worker reads host memory
        h = DecodeHandoff(store, list(range(self.L)), QWEN_K, QWEN_D, torch.bfloat16, self.dev)
        try:
            ids = self._ids(QWEN_K)
            w = torch.full((1, QWEN_K), 1.0 / QWEN_K, dtype=torch.bfloat16, device=self.dev)
            slot_row = torch.arange(self.E, dtype=torch.int32, device=self.dev)   # every expert resident
            if miss:                                                             # ... but one per layer
                rows = []
                for i in ids:
                    r = slot_row.clone()
                    r[i[0, 0]] = -1
                    rows.append(r)
            else:
                rows = [slot_row] * len(ids)
            y = torch.zeros(1, QWEN_D, dtype=torch.float32, device=self.dev)

            def body():
                for layer, (i, r) in enumerate(zip(ids, rows, strict=True)):
                    h.post(layer, self.x, i, w, r)
                    h.collect(layer, i, r, y, torch.bfloat16)
            t = self._graphed(body)
            steps = 2 + self.repeats                                   # warm-up, capture run, replays
            cpu = float(h.take_step().cpu_s.sum()) / (steps * self.L)
            return t, cpu
        finally:
            h.close()


def _pin(w):
    return pin_weight(w)


def decode_terms(bench, h2d_gbs: float, k: int = QWEN_K) -> dict:
    """The graphed decode terms from a bench (CudaDecodeBench or a stand-in with the same methods)."""
    out, src = {}, {}
    launch, gbs = call_terms({1: bench.slot_kernel(1), k: bench.slot_kernel(k)}, bench.expert_bytes)
    out["gpu_moe_launch_s"], out["gpu_expert_gbs"] = launch, {"int4": gbs}
    src["gpu_moe_launch_s, gpu_expert_gbs.int4"] = f"measured: graphed slot kernel, 1 and {k} int4 experts"
    t_none, _ = bench.mailbox(False)
    t_miss, cpu = bench.mailbox(True)
    out["post_s"] = t_none
    out["handoff_s"] = max(0.0, t_miss - t_none - cpu)
    src["post_s, handoff_s"] = ("measured: graphed post + collect per layer, no miss / one miss (minus the "
                                "worker's compute)")
    one = bench.host_read(1)
    out["gpu_host_read_s"] = max(0.0, one - bench.expert_bytes / (h2d_gbs * 1e9))
    src["gpu_host_read_s"] = "measured: the GPU computing one int4 expert from pinned host memory, minus " \
                             "its bytes / h2d_gbs"
    return out | {"_sources": src}


# ---- fitting on a bench report of this machine ---------------------------------------------------------
def bench_fit(hw: HardwareProfile, paths, engine: str | None = None, log=print) -> HardwareProfile:
    """Fit the decode terms on `hotexperts bench --json` reports of this machine (every tg row)."""

    cases = []
    for i, path in enumerate(paths):
        report = json.loads(Path(path).read_text())
        quant = {"none": "none", "int8": "int8", "int4": "int4"}.get(str(report.get("expert_quant", "none")))
        shape = shape_for(str(report.get("preset") or "").removeprefix("preset:"), quant or "none")
        if shape is None:
            raise HotExpertsError(f"{path}: no cost-model shape for preset {report.get('preset')!r}")
        cases += F.cases_from_report(report, shape, engine=engine or F.report_engine(path), tag=f"b{i}")[0]
    cpu_rows, time_rows, free = auto_fit_rows(cases)
    hw2, info = F.fit_decode(cases, hw, cpu_rows=cpu_rows, time_rows=time_rows, free=free)
    for k, v in info["values"].items():
        log(f"fitted {k}: {v:.4g}")
    src = dict(hw2.sources or {})
    names = ", ".join(info["values"])
    src[names] = f"fitted on {', '.join(str(p) for p in paths)} (engine {engine or 'of each report'})"
    src["fit"] = {"cpu_rows": cpu_rows, "time_rows": time_rows, "free": free}
    return replace(hw2, sources=src)


def auto_fit_rows(cases) -> tuple[list[str], list[str], list[str]]:
    """Which rows and terms a bench report can fit: the CPU line needs calls of many and of few experts;
    each time term needs a row that depends on it."""
    kinds = {c.id: c.cost_placement.split(":")[0] for c in cases}
    cpu_rows = [c.id for c in cases if c.cpu_ms and c.cpu_ms > 0.05]
    many = any(kinds[i] in ("cpu-moe", "n-cpu-moe") for i in cpu_rows)
    few = any(kinds[i] in ("hot", "cache") for i in cpu_rows)
    if not (many and few):
        cpu_rows = []
    free = []
    if "gpu" in kinds.values():
        free.append("gpu_layer_s")
    if any(k in ("cpu-moe", "n-cpu-moe") and c.cost_placement != "n-cpu-moe:0"
           for c, k in ((c, kinds[c.id]) for c in cases)):
        free.append("post_s")
    if any(c.cost_placement == "n-cpu-moe:0" for c in cases):
        free.append("host_step_s")
    for pol in sorted({c.kw.get("policy") or default_policy(c.cost_placement) for c in cases
                       if kinds[c.id] in ("hot", "cache")}):
        free.append(f"host_policy_s:{pol}")
    time_rows = [c.id for c in cases]
    return cpu_rows, time_rows, free[:len(time_rows)]


# ---- the command ---------------------------------------------------------------------------------------
def measure(base: str = "h200", mib: int = 1024, h2d_mib: int = 256, formats=("bf16", "int8", "int4"),
            matmul: int = 512, log=print, gap_s: float = 300e-6, decode_bench=None) -> HardwareProfile:
    hw = BUILTIN[base]
    figures: dict = {"cpu_read_gbs": cpu_read_gbs(mib)}
    sources = {"cpu_read_gbs": "measured (calibrate: sum over --size-mib)"}
    log(f"cpu read: {figures['cpu_read_gbs']:.1f} GB/s")
    experts, notes, call = dict(hw.cpu_expert_gbs), [], None
    for fmt in formats:
        try:
            times, per_expert = cpu_call_times(fmt, mib, gap_s=gap_s)
            c, experts[fmt] = call_terms(times, per_expert)
            call = c if call is None else call
            sources[f"cpu_expert_gbs.{fmt}"] = "measured (calibrate: 1- and 8-expert calls)"
            log(f"cpu experts {fmt}: call {c * 1e6:.0f} us + {experts[fmt]:.1f} GB/s per expert "
                f"({', '.join(f'{k}: {t * 1e6:.0f} us' for k, t in times.items())})")
        except Exception as e:          # a format the kernels cannot run here keeps the base figure
            notes.append(f"cpu {fmt} kept from {base}: {type(e).__name__}: {e}")
    figures["cpu_expert_gbs"] = experts
    if call is not None:
        figures["cpu_call_s"] = call
        sources["cpu_call_s"] = "measured (calibrate: intercept of the first format's call line)"
    figures["cpu_tflops"] = cpu_tflops(matmul, 4 * matmul)
    sources["cpu_tflops"] = "measured (calibrate)"
    if torch.cuda.is_available() or decode_bench is not None:
        if torch.cuda.is_available():
            figures |= cuda_figures(h2d_mib)
            sources["h2d_gbs, gpu_hbm_gbs, gpu_tflops, sync_s, gpu_layer_overhead_s"] = "measured (calibrate)"
            log(f"h2d {figures['h2d_gbs']:.1f} GB/s, sync {figures['sync_s'] * 1e6:.0f} us, "
                f"hbm {figures['gpu_hbm_gbs']:.0f} GB/s")
        try:
            d = decode_terms(decode_bench or CudaDecodeBench(), figures.get("h2d_gbs", hw.h2d_gbs))
            sources |= d.pop("_sources")
            d["gpu_expert_gbs"] = dict(hw.gpu_expert_gbs) | d["gpu_expert_gbs"]
            figures |= d
            log(f"decode: slot kernel {d['gpu_moe_launch_s'] * 1e6:.1f} us + "
                f"{d['gpu_expert_gbs']['int4']:.0f} GB/s, post {d['post_s'] * 1e6:.1f} us, handoff "
                f"{d['handoff_s'] * 1e6:.1f} us, GPU host read {d['gpu_host_read_s'] * 1e6:.0f} us")
        except Exception as e:          # no triton, no native worker: keep the base figures
            notes.append(f"decode kernel terms kept from {base}: {type(e).__name__}: {e}")
        notes.append("gpu_layer_s and host bookkeeping need a bench run: calibrate --bench BENCH.json")
    else:
        notes.append(f"no CUDA: GPU, PCIe, sync and decode kernel figures kept from {base}")
    return replace(hw, name=f"calibrated-{time.strftime('%Y%m%d')}", label="calibrated",
                   notes="; ".join(notes), sources=dict(hw.sources) | sources, **figures)


def run(args) -> int:
    hw = measure(args.base, args.size_mib, args.h2d_mib, gap_s=args.gap_us * 1e-6)
    if args.bench:
        hw = bench_fit(hw, args.bench, args.engine)
    doc = save_hardware(args.out, hw)
    print(f"wrote {doc} ({hw.label}; base {args.base})")
    return 0
