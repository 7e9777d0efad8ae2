"""Predicted decode and prompt tokens/s of an expert placement (torch-free). Formulas: docs/simulator.md.

    ModelShape                 the sizes the model needs (SHAPES: named presets; shape_from_config(cfg))
    predict(shape, hw, placement, *, hit_rate=, layer_hit=, prompt_hit=, swaps_per_token=, slots=)
        -> Prediction(decode_tps, prompt_tps, decode_ms: dict of terms, vram_gb)
    placement: "gpu" | "cpu-moe" | "n-cpu-moe:N" | "hot:K" | "cache:SLOTS"  (hot/cache need a hit rate)
    predict_cache(shape, hw, sim_result)       a simulator row -> Prediction
    cpu_expert_seconds(shape, hw), copy_seconds(shape, hw)    per expert, one decode token

Per MoE layer and decode token, with h = hit rate, K = top-k, p = 1 - h**K (chance the layer has CPU work):
    gpu_l = dense_l + overhead + max(K h Bg / HBM + launch [h > 0],  K (1-h) Bc / CPUbw + p call) + p sync
and the copies of swaps run on the copy engine alongside: t_token = max(sum_l gpu_l + head, swaps Bg / H2D).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from hotexperts.errors import HotExpertsError
from hotexperts.trace.profiles import HardwareProfile

CPU_BYTES_PER_PARAM = {"bf16": 2.0, "fp32": 4.0, "int8": 1.0 + 2 / 1024, "int4": 0.5 + 2 / 32}


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


SHAPES = {   # name: layers, MoE layers, E, K, D, I, dense params per layer (attention + router), lm_head
    "qwen3-30b-a3b": ModelShape("qwen3-30b-a3b", 48, 48, 128, 8, 2048, 768,
                                _attn(2048, 32, 4, 128) + 2048 * 128, 151936 * 2048),
    "mixtral-8x7b": ModelShape("mixtral-8x7b", 32, 32, 8, 2, 4096, 14336,
                               _attn(4096, 32, 8, 128) + 4096 * 8, 32000 * 4096),
    "olmoe-1b-7b": ModelShape("olmoe-1b-7b", 16, 16, 64, 8, 2048, 1024,
                              _attn(2048, 16, 16, 128) + 2048 * 64, 50304 * 2048),
}


def shape_from_config(cfg, cpu_format: str = "int8") -> ModelShape:
    """From a hotexperts ModelConfig (duck-typed: no import of the engine)."""
    attn = _attn(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
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


@dataclass
class Prediction:
    decode_tps: float
    prompt_tps: float
    decode_ms: dict             # per-token time by term (the critical path; overlapped terms as charged)
    vram_gb: float

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_expert_seconds(shape: ModelShape, hw: HardwareProfile) -> float:
    return shape.expert_bytes_cpu / (hw.cpu_gbs(shape.cpu_format) * 1e9)


def copy_seconds(shape: ModelShape, hw: HardwareProfile) -> float:
    return shape.expert_bytes_gpu / (hw.h2d_gbs * 1e9)


def _decode_layer(shape: ModelShape, hw: HardwareProfile, h: float, terms: dict) -> float:
    K = shape.top_k
    p_cpu = 1.0 - h ** K
    dense = shape.dense_params_per_layer * 2 / (hw.gpu_hbm_gbs * 1e9) + hw.gpu_layer_overhead_s
    gpu = K * h * shape.expert_bytes_gpu / (hw.gpu_hbm_gbs * 1e9) + (hw.gpu_moe_launch_s if h > 0 else 0.0)
    cpu = K * (1 - h) * cpu_expert_seconds(shape, hw) + p_cpu * hw.cpu_call_s
    sync = p_cpu * hw.sync_s
    terms["gpu_dense"] += dense
    terms["gpu_experts" if gpu >= cpu else "cpu_experts"] += max(gpu, cpu)
    terms["sync"] += sync
    return dense + max(gpu, cpu) + sync


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
        slots = int(arg) * (Lm if kind == "hot" else 1) if arg else 0
        return hits, slots
    raise HotExpertsError(f"unknown placement {placement!r}: gpu, cpu-moe, n-cpu-moe:N, hot:K, cache:SLOTS")


def predict(shape: ModelShape, hw: HardwareProfile, placement: str, *, hit_rate: float | None = None,
            layer_hit=None, prompt_hit: float | None = None, swaps_per_token: float = 0.0,
            prompt_tokens: int = 512) -> Prediction:
    hits, slots = _layer_hits(shape, placement, hit_rate, layer_hit)
    terms = {"gpu_dense": 0.0, "gpu_experts": 0.0, "cpu_experts": 0.0, "sync": 0.0, "head": 0.0, "copy": 0.0}
    compute = sum(_decode_layer(shape, hw, h, terms) for h in hits)
    dense_only = shape.num_layers - shape.num_moe_layers
    dense_layer = shape.dense_params_per_layer * 2 / (hw.gpu_hbm_gbs * 1e9) + hw.gpu_layer_overhead_s
    compute += dense_only * dense_layer
    terms["head"] = shape.head_params * 2 / (hw.gpu_hbm_gbs * 1e9)
    compute += terms["head"]
    copy = swaps_per_token * copy_seconds(shape, hw)
    terms["copy"] = max(0.0, copy - compute)                   # only what the copy engine adds beyond compute
    t_token = max(compute, copy)
    ph = [prompt_hit] * len(hits) if prompt_hit is not None else hits
    t_prompt = sum(_prompt_layer(shape, hw, h, prompt_tokens) for h in ph)
    t_prompt += 2.0 * prompt_tokens * shape.head_params / (hw.gpu_tflops * 1e12)
    vram = (shape.dense_bytes + slots * shape.expert_bytes_gpu) / 2**30
    return Prediction(1.0 / t_token, prompt_tokens / t_prompt, {k: v * 1e3 for k, v in terms.items()}, vram)


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
