"""Predicted decode and prompt tokens/s of an expert placement (torch-free). Formulas: docs/simulator.md.

    ModelShape                 the sizes the model needs (SHAPES: named presets; shape_from_config(cfg))
    predict(shape, hw, placement, *, hit_rate=, layer_hit=, prompt_hit=, swaps_per_token=,
                    gpu_misses=None, gpu_share=None, policy=None, deferred_host=True, cpu_scale=1.0)
        -> Prediction(decode_tps, prompt_tps, decode_ms: dict of terms, vram_gb, cpu_ms)
    placement: "gpu" | "cpu-moe" | "n-cpu-moe:N" | "hot:K" | "cache:SLOTS"  (hot/cache need a hit rate)
    predict_cache(shape, hw, sim_result)       a simulator row -> Prediction
    cpu_expert_seconds(shape, hw), copy_seconds(shape, hw)    per expert, one decode token
    payback_shape(trace, name=None, expert_mb=None)   shape_for_trace, else one from the trace's metadata
    payback_costs(shape, hw) -> {cpu_seconds_per_expert, copy_seconds_per_expert}   (auto's pay-back)
    miss_pmf(K, h), gpu_share_of(n, Z, share), cpu_call_seconds(shape, hw, n), hit_kernel_seconds(...)

Decode is the engine's worker path (docs/cache.md): the whole step is one CUDA graph; per MoE layer the GPU
posts the misses to a host mailbox, a CPU worker computes them while the GPU computes the hits from its
slots, then the GPU waits for the CPU's sum. Per token, with K = top-k, n ~ Binomial(K, 1 - h_l) misses of
MoE layer l, z(n) = min(Z, n // share) of them read by the GPU over PCIe (share: 4, 2 for experts of
32 MiB or more; run 5: 1) and c(n) = n - z(n) by the CPU:
    dense_l  = dense_bytes_l / HBM + gpu_layer                               (every decoder layer)
    hits(m)  = gpu_moe_launch + m Bg / GPU_bw(slot format)                   (the slot kernel, m hits)
    read(z)  = [z > 0] (gpu_host_read + z Bc / H2D)                          (GPU-computed misses)
    cpu(c)   = cpu_call + c Bc / CPU_bw(format)                              (one worker call, c experts)
    gpu layer   (all resident, no policy): hits(K)
    cpu / split layer (posts): post [+ gpu_moe_launch if Z > 0] + E_n[ hits(K - n) [split]
                   + read(z) + [c > 0] (max(0, cpu(c) - hits(K - n) - read(z)) + handoff) ]
    device   = sum_l dense_l + sum_l moe_l + head_bytes / HBM
    host     = host_step [hybrid executor] + (host_policy(policy) + swaps host_swap) [hot/cache]
    compute  = device + host (bookkeeping between steps) | max(device, host) when deferred_host
    t_token  = max(compute, swaps Bg / H2D)            (fills run on the copy engine alongside)
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

import numpy as np

from hotexperts.errors import HotExpertsError
from hotexperts.kernels.handoff_codes import GPU_SHARE, LARGE_EXPERT_BYTES  # the engine's GPU-miss rule
from hotexperts.trace.profiles import HardwareProfile

CPU_BYTES_PER_PARAM = {"bf16": 2.0, "fp32": 4.0, "int8": 1.0 + 4 / 1024, "int4": 0.5 + 4 / 32}


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int                 # decoder layers
    num_moe_layers: int
    num_experts: int                # E
    top_k: int                      # K
    hidden_size: int                # D
    moe_intermediate_size: int      # I
    dense_params_per_layer: int     # attention + router + shared expert (+ dense MLP), read per token
    head_params: int                # lm_head (+ final norm), read per token
    gpu_bytes_per_param: float = 2.0    # slot format (bf16)
    cpu_format: str = "int8"            # the CPU copy of the experts: bf16 | int8 | int4

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def gpu_format(self) -> str:
        """The slot format implied by its bytes per parameter: bf16 (>= 1.5), int8 (>= 0.9) or int4."""
        b = self.gpu_bytes_per_param
        return "bf16" if b >= 1.5 else "int8" if b >= 0.9 else "int4"

    @property
    def expert_bytes_gpu(self) -> int:
        return int(self.expert_params * self.gpu_bytes_per_param)

    @property
    def expert_bytes_cpu(self) -> int:
        return int(self.expert_params * CPU_BYTES_PER_PARAM.get(self.cpu_format, 2.0))

    @property
    def dense_bytes(self) -> int:
        return int((self.dense_params_per_layer * self.num_layers + self.head_params) * 2)


def _attn(d, heads, kv, hd) -> int:
    return d * heads * hd * 2 + d * kv * hd * 2


def _hybrid(d, heads, kv, hd, hk, hv, dk, dv, every=4) -> int:
    """Mean token-mixer params of a hybrid layer stack: 1 in `every` gated attention (q_proj doubled for
    the gate), the rest Gated DeltaNet (in_proj_qkv, in_proj_z, in_proj_b/a, out_proj)."""
    attn = d * heads * hd * 3 + d * kv * hd * 2
    delta = d * (2 * hk * dk + hv * dv) + d * hv * dv * 2 + 2 * d * hv
    return (attn + (every - 1) * delta) // every


def _moe_extra(d, e, shared) -> int:
    return d * e + 3 * d * shared + d          # router, shared expert and its gate


SHAPES = {   # name: layers, MoE layers, E, K, D, I, dense params per layer (attention + router), lm_head
    "qwen3-30b-a3b": ModelShape("qwen3-30b-a3b", 48, 48, 128, 8, 2048, 768,
                                _attn(2048, 32, 4, 128) + 2048 * 128, 151936 * 2048),
    "mixtral-8x7b": ModelShape("mixtral-8x7b", 32, 32, 8, 2, 4096, 14336,
                               _attn(4096, 32, 8, 128) + 4096 * 8, 32000 * 4096),
    "olmoe-1b-7b": ModelShape("olmoe-1b-7b", 16, 16, 64, 8, 2048, 1024,
                              _attn(2048, 16, 16, 128) + 2048 * 64, 50304 * 2048),
    "qwen3.5-122b-a10b": ModelShape("qwen3.5-122b-a10b", 48, 48, 256, 8, 3072, 1024,
                                    _hybrid(3072, 32, 2, 256, 16, 64, 128, 128) + _moe_extra(3072, 256, 1024),
                                    248320 * 3072),
    "qwen3.5-35b-a3b": ModelShape("qwen3.5-35b-a3b", 40, 40, 256, 8, 2048, 512,
                                  _hybrid(2048, 16, 2, 256, 16, 32, 128, 128) + _moe_extra(2048, 256, 512),
                                  248320 * 2048),
    "qwen3-next-80b-a3b": ModelShape("qwen3-next-80b-a3b", 48, 48, 512, 10, 2048, 512,
                                     _hybrid(2048, 16, 2, 256, 16, 32, 128, 128) + _moe_extra(2048, 512, 512),
                                     151936 * 2048),
}


def shape_from_config(cfg, cpu_format: str = "int8") -> ModelShape:
    """From a hotexperts ModelConfig (duck-typed: no import of the engine)."""
    attn = _attn(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    s = getattr(cfg, "linear", None)
    if s is not None and cfg.layer_types:                                # hybrid: mean over layer kinds
        every = cfg.num_layers // max(1, len(cfg.attention_layers))
        attn = _hybrid(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, s.num_key_heads,
                       s.num_value_heads, s.key_head_dim, s.value_head_dim, every)
    shared = 3 * cfg.hidden_size * cfg.shared_expert_intermediate_size
    dense = attn + cfg.hidden_size * cfg.num_experts + shared
    return ModelShape(cfg.model_type, cfg.num_layers, len(cfg.moe_layers), cfg.num_experts, cfg.top_k,
                      cfg.hidden_size, cfg.moe_intermediate_size, dense, cfg.vocab_size * cfg.hidden_size,
                      cpu_format=cpu_format)


def shape_for_trace(trace, name: str | None = None, expert_mb: float | None = None) -> ModelShape | None:
    """A named preset, else one recognised from the trace's model name; `expert_mb` overrides expert size."""
    model = re.sub(r"[^a-z0-9]+", "-", str(trace.meta.get("model", "")).lower())
    key = name or next((k for k in SHAPES if k in model), None)
    if key is not None and key not in SHAPES:
        raise HotExpertsError(f"unknown model shape {key!r}; choose from {', '.join(SHAPES)}")
    shape = SHAPES.get(key) if key else None
    if shape is not None:
        shape = replace(shape, num_moe_layers=trace.num_layers, num_experts=trace.num_experts,
                        top_k=trace.top_k)
    if expert_mb:
        base = shape or ModelShape("custom", trace.num_layers, trace.num_layers, trace.num_experts,
                                   trace.top_k, 2048, 1, 20_000_000, 300_000_000)
        inter = max(1, round(expert_mb * 1e6 / (3 * base.hidden_size * base.gpu_bytes_per_param)))
        shape = replace(base, moe_intermediate_size=inter)
    return shape


FILE_BYTES_PER_PARAM = 4.5 / 8     # meta["expert_bytes"] without meta["expert_bytes_per_param"]: GGUF Q4_K
NOMINAL_EXPERT = (1024, 512)       # D, I when the trace says nothing of the size (pay-back needs only ratios)


def payback_shape(trace, name: str | None = None, expert_mb: float | None = None) -> ModelShape:
    """The shape `auto`'s pay-back costs come from, for any trace: a named or recognised preset
    (shape_for_trace), else one built from the trace's metadata: `hidden_size` and `moe_intermediate_size`
    (a recorded model's config), `expert_params`, or `expert_bytes` (bytes of one expert in the recorded
    file: a number or {layer: bytes}, mean taken) ÷ `expert_bytes_per_param` (default 4.5 bits: Q4_K);
    else a nominal size. Slot format bf16, CPU copy int8 (the defaults of the live cache). The pay-back
    rule compares CPU time with copy time of the same expert, so only the formats' bytes per parameter and
    the profile's rates decide it; the expert's size cancels out."""
    shape = shape_for_trace(trace, name, expert_mb)
    if shape is not None:
        return shape
    meta = trace.meta
    D, I = (int(meta.get("hidden_size") or 0), int(meta.get("moe_intermediate_size") or 0))
    params = 3 * D * I if D and I else int(meta.get("expert_params") or 0)
    eb = meta.get("expert_bytes")
    if not params and eb:
        vals = [float(v) for v in (eb.values() if isinstance(eb, dict) else [eb])]
        params = int(np.mean(vals) / float(meta.get("expert_bytes_per_param", FILE_BYTES_PER_PARAM)))
    D = D or NOMINAL_EXPERT[0]
    I = max(1, round(params / (3 * D))) if params else NOMINAL_EXPERT[1]
    return ModelShape(f"from-trace:{meta.get('model', 'unknown')}", trace.num_layers, trace.num_layers,
                      trace.num_experts, trace.top_k, D, I, 0, 0)


def payback_costs(shape: ModelShape | None, hw: HardwareProfile | None) -> dict:
    """Pay-back inputs of the `auto` policy (seconds per expert, one decode token) from a shape and a
    hardware profile: the CPU copy's bytes ÷ the profile's CPU rate for its format, the slot copy's bytes
    ÷ H2D. Empty without both."""
    if shape is None or hw is None:
        return {}
    return {"cpu_seconds_per_expert": cpu_expert_seconds(shape, hw),
            "copy_seconds_per_expert": copy_seconds(shape, hw)}


@dataclass
class Prediction:
    decode_tps: float
    prompt_tps: float
    decode_ms: dict             # per-token time by term (the critical path; overlapped terms as charged)
    vram_gb: float
    cpu_ms: float = 0.0         # CPU kernel time per decoded token (the bench's cpu_ms_per_token)

    def to_dict(self) -> dict:
        return asdict(self)


TERMS = ("gpu_dense", "gpu_experts", "post", "handoff", "cpu_wait", "gpu_misses", "host", "copy")


def cpu_expert_seconds(shape: ModelShape, hw: HardwareProfile) -> float:
    """Marginal CPU time of one more expert in a call (what a hit saves the CPU)."""
    return shape.expert_bytes_cpu / (hw.cpu_gbs(shape.cpu_format) * 1e9)


def copy_seconds(shape: ModelShape, hw: HardwareProfile) -> float:
    return shape.expert_bytes_gpu / (hw.h2d_gbs * 1e9)


def cpu_call_seconds(shape: ModelShape, hw: HardwareProfile, n: int) -> float:
    """One CPU worker call with n experts (the fused kernel over the layer's CPU misses)."""
    return hw.cpu_call_s + n * cpu_expert_seconds(shape, hw)


def hit_kernel_seconds(shape: ModelShape, hw: HardwareProfile, m: float) -> float:
    """The slot kernel of one decode layer over m resident experts (graphed)."""
    return hw.gpu_moe_launch_s + m * shape.expert_bytes_gpu / (hw.gpu_expert_rate(shape.gpu_format) * 1e9)


def gpu_read_seconds(shape: ModelShape, hw: HardwareProfile, z: int) -> float:
    """The GPU computing z missed experts straight from pinned host memory (UVA reads over PCIe)."""
    return hw.gpu_host_read_s + z * shape.expert_bytes_cpu / (hw.h2d_gbs * 1e9) if z > 0 else 0.0


def miss_pmf(K: int, h: float) -> list[float]:
    """P(n misses of K routed experts), n = 0..K, for independent selections with hit rate h."""
    q = min(1.0, max(0.0, 1.0 - h))
    return [math.comb(K, n) * q**n * (1.0 - q) ** (K - n) for n in range(K + 1)]


def engine_share(shape: ModelShape) -> int:
    """The engine's misses-per-GPU-miss for this expert size: 2 from 32 MiB (Mixtral: 88 MB), else 4."""
    return 2 if shape.expert_bytes_cpu >= LARGE_EXPERT_BYTES else GPU_SHARE


def gpu_share_of(n: int, Z: int, share: int = GPU_SHARE) -> int:
    """Misses of a layer with n misses that the GPU reads itself: min(Z, n // share) (0 when Z = 0)."""
    return min(Z, n // max(share, 1)) if Z > 0 else 0


def _layer_kinds(placement: str, Lm: int) -> tuple[list[str], bool, bool]:
    """-> (kind per MoE layer: gpu | cpu | split, hybrid executor, managed cache)."""
    kind, _, arg = placement.replace(" ", ":").partition(":")
    if kind == "gpu":
        return ["gpu"] * Lm, False, False
    if kind == "cpu-moe":
        return ["cpu"] * Lm, True, False
    if kind == "n-cpu-moe":
        n = min(int(arg), Lm)
        return ["cpu"] * n + ["gpu"] * (Lm - n), True, False
    return ["split"] * Lm, True, True


def _decode_device(shape: ModelShape, hw: HardwareProfile, kinds, hits, Z: int, share: int,
                   cpu_scale: float, terms: dict) -> float:
    """Device time of the MoE layers of one token (seconds); fills terms (seconds) and terms['_cpu']."""
    K = shape.top_k
    total = 0.0
    for kind, h in zip(kinds, hits, strict=True):
        if kind == "gpu":
            t = hit_kernel_seconds(shape, hw, K)
            terms["gpu_experts"] += t
            total += t
            continue
        post = hw.post_s + (hw.gpu_moe_launch_s if Z > 0 else 0.0)
        terms["post"] += post
        total += post
        for n, p in enumerate(miss_pmf(K, h)):
            if p == 0.0:
                continue
            z = gpu_share_of(n, Z, share)
            c = n - z
            g_hit = hit_kernel_seconds(shape, hw, K - n) if kind == "split" else 0.0
            g_read = gpu_read_seconds(shape, hw, z)
            terms["gpu_experts"] += p * g_hit
            terms["gpu_misses"] += p * g_read
            total += p * (g_hit + g_read)
            if c > 0:
                cpu = cpu_scale * cpu_call_seconds(shape, hw, c)
                terms["_cpu"] += p * cpu
                wait = max(0.0, cpu - g_hit - g_read)
                terms["cpu_wait"] += p * wait
                terms["handoff"] += p * hw.handoff_s
                total += p * (wait + hw.handoff_s)
    return total


def _prompt_layer(shape: ModelShape, hw: HardwareProfile, h: float, P: int) -> float:
    E, K, Bg = shape.num_experts, shape.top_k, shape.expert_bytes_gpu
    touched = E * (1 - (1 - K / E) ** P)                      # distinct experts a batch of P routes to
    flops = 2.0 * P * K * shape.expert_params                 # all routed expert work of the layer
    gflops, hbm = hw.gpu_tflops * 1e12, hw.gpu_hbm_gbs * 1e9
    dense = max(2.0 * P * shape.dense_params_per_layer / gflops, shape.dense_params_per_layer * 2 / hbm)
    hit_gpu = max(h * flops / gflops, h * touched * Bg / hbm)
    miss = 1 - h
    if miss <= 0:
        return dense + hit_gpu + hw.gpu_layer_overhead_s
    # double-buffered streaming of the missing experts to the GPU, or computing them on the CPU
    stream = max(miss * touched * Bg / (hw.h2d_gbs * 1e9), hit_gpu + miss * flops / gflops)
    on_cpu = max(hit_gpu, miss * flops / (hw.cpu_tflops * 1e12)
                 + miss * touched * shape.expert_bytes_cpu / (hw.cpu_gbs(shape.cpu_format) * 1e9)
                 + hw.cpu_call_s) + hw.sync_s
    return dense + min(stream, on_cpu) + hw.gpu_layer_overhead_s


def _layer_hits(shape: ModelShape, placement: str, hit_rate, layer_hit) -> tuple[list[float], int]:
    """Per MoE layer decode hit rate and the number of expert slots on the GPU."""
    Lm, E = shape.num_moe_layers, shape.num_experts
    kind, _, arg = placement.replace(" ", ":").partition(":")
    if kind == "gpu":
        return [1.0] * Lm, Lm * E
    if kind == "cpu-moe":
        return [0.0] * Lm, 0
    if kind == "n-cpu-moe":
        n = min(int(arg), Lm)
        return [0.0] * n + [1.0] * (Lm - n), (Lm - n) * E
    if kind in ("hot", "cache"):
        if layer_hit is None and hit_rate is None:
            raise HotExpertsError(f"placement {placement!r} needs a hit rate (from `hotexperts simulate`)")
        hits = list(layer_hit) if layer_hit is not None else [float(hit_rate)] * Lm
        if len(hits) != Lm:
            raise HotExpertsError(f"{len(hits)} per-layer hit rates for a shape of {Lm} MoE layers")
        slots = int(arg) * (Lm if kind == "hot" else 1) if arg else 0
        return hits, slots
    raise HotExpertsError(f"unknown placement {placement!r}: gpu, cpu-moe, n-cpu-moe:N, hot:K, cache:SLOTS")


def auto_gpu_misses(placement: str) -> int:
    """The engine's --moe-gpu-misses auto: 0 for every placement (since run 7: the GPU's PCIe read of an
    expert measured slower than the CPU computing it). Runs 5-6 used 2 for hot / cache (fit.py engines)."""
    return 0


def default_policy(placement: str) -> str | None:
    """The engine's default policy of a placement (experts/placement.py): hot window-lfu, cache auto."""
    return {"hot": "window-lfu", "cache": "auto"}.get(placement.split(":")[0])


def predict(shape: ModelShape, hw: HardwareProfile, placement: str, *, hit_rate: float | None = None,
            layer_hit=None, prompt_hit: float | None = None, swaps_per_token: float = 0.0,
            prompt_tokens: int = 512, gpu_misses: int | None = None, gpu_share: int | None = None,
            policy: str | None = None, deferred_host: bool = True, cpu_scale: float = 1.0) -> Prediction:
    """gpu_misses: most misses per layer the GPU reads from host memory (None: the engine's auto), taking
    one per `gpu_share` misses (None: the engine's, engine_share(); run 5's engine: the first N, i.e.
    gpu_share=1); policy: the cache policy
    whose host bookkeeping is charged (None: the placement's default); deferred_host: the host's
    bookkeeping overlaps the device step (the engine after run 5) instead of running between steps;
    cpu_scale multiplies every CPU call time (fidelity: set it so the CPU time equals a measured one)."""
    hits, slots = _layer_hits(shape, placement, hit_rate, layer_hit)
    kinds, hybrid, managed = _layer_kinds(placement, len(hits))
    Z = auto_gpu_misses(placement) if gpu_misses is None else int(gpu_misses)
    gpu_share = engine_share(shape) if gpu_share is None else int(gpu_share)
    terms = dict.fromkeys(TERMS, 0.0) | {"_cpu": 0.0}
    hbm = hw.gpu_hbm_gbs * 1e9
    dense = shape.num_layers * (shape.dense_params_per_layer * 2 / hbm + hw.gpu_layer_s)
    terms["gpu_dense"] = dense + shape.head_params * 2 / hbm
    device = terms["gpu_dense"] + _decode_device(shape, hw, kinds, hits, Z, gpu_share, cpu_scale, terms)
    host = ((hw.host_step_s if hybrid else 0.0)
            + ((hw.policy_seconds(policy or default_policy(placement)) + swaps_per_token * hw.host_swap_s)
               if managed else 0.0))
    terms["host"] = max(0.0, host - device) if deferred_host else host
    compute = device + terms["host"]
    copy = swaps_per_token * copy_seconds(shape, hw)
    terms["copy"] = max(0.0, copy - compute)                   # only what the copy engine adds beyond compute
    t_token = max(compute, copy)
    if t_token <= 0:
        raise HotExpertsError(f"non-positive decode time ({t_token:.3g} s): negative terms in profile "
                              f"{hw.name!r}")
    cpu_ms = terms.pop("_cpu") * 1e3
    ph = [prompt_hit] * len(hits) if prompt_hit is not None else hits
    t_prompt = sum(_prompt_layer(shape, hw, h, prompt_tokens) for h in ph)
    t_prompt += 2.0 * prompt_tokens * shape.head_params / (hw.gpu_tflops * 1e12)
    vram = (shape.dense_bytes + slots * shape.expert_bytes_gpu) / 2**30
    return Prediction(1.0 / t_token, prompt_tokens / t_prompt, {k: v * 1e3 for k, v in terms.items()}, vram,
                      cpu_ms)


def predict_cache(shape: ModelShape, hw: HardwareProfile, result) -> Prediction:
    """Prediction for a simulator result (SimResult: per-layer hit rates, swaps per token, capacity)."""
    if result.budget is not None:
        placement = f"cache:{result.budget}"
    else:
        placement = f"hot:{result.slots}"
    if len(result.layer_hit_rate) != shape.num_moe_layers:
        shape = replace(shape, num_moe_layers=len(result.layer_hit_rate))
    return predict(shape, hw, placement, layer_hit=result.layer_hit_rate,
                   prompt_hit=result.prompt_hit_rate if result.prompt_selections else None,
                   swaps_per_token=result.swaps_per_token)
