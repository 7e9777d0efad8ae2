"""Memory checked before loading: what a model will take in host RAM and in VRAM, against what this machine
has available, decided before any big allocation (a model too big for RAM used to end in torch's
"DefaultCPUAllocator: can't allocate memory" after tens of seconds).

    need = memory_need(source, dtype, device, placement, max_context=None, expert_format=None,
                       parallel=1, verify_tokens=0)
           -> MemoryNeed | None        (None: nothing to read a size from; the loader reports the source)
    check_memory(need, ram=available_ram(), vram=free_vram(device))   HotExpertsError with what to change
    check_before_load(source, dtype, device, placement, ...)           both: Engine.load's and bench's call

Sizes are bytes, read from the source without loading it: a preset's or a directory's config (routed
experts = MoE layers x E x 3*D*I parameters, dense = the model's own parameters, counted on the meta
device), a GGUF's tensor table (tensors named *_exps are experts, the rest dense). Where they live:

    CPU device     RAM  = experts + dense + KV cache
    CUDA device    RAM  = experts (the host store every placement keeps)
                   VRAM = dense + KV cache + the batched / verify steps' memory + the experts the
                          placement puts on the GPU (all for `gpu`, the last L - N layers for `layers:N`,
                          K per layer for `hot:K`, SIZE for `cache:SIZE`; placements sized by the budget add
                          nothing: the solver sizes them)

The KV cache (and linear-attention state) is counted for `parallel` sequence slots (`serve -np N`,
`bench --parallel`). The step memory the engine's VRAM plan also reserves (experts/solve.py's reserved
parts) is computed here, for both:

    step_activation_bytes(cfg, dtype, T, S) -> bytes    one T-token forward's transient tensors over S keys
    feature_bytes(cfg, dtype, S, parallel=1, verify_tokens=0, graphs=False, quantized_cuda=False,
                  prompt_chunk=512, cublas_stream=CUBLAS_STREAM_BYTES) -> {"graphs", "verify", "batch"}
        graphs   each CUDA graph memory pool's allocator slack (ALLOCATOR_SLACK: the T=1 decode graph's, the
                 verify buckets' shared one) + the cuBLAS workspace of each stream the captures run matmuls
                 on (torch keeps one per stream; the measured context holds only the main stream's)
        verify   a verify step of verify_tokens tokens in its graph pool: its activations + one dequantize
                 chunk (T * K pairs over 32 leave the GEMV for the dequantizing prompt pass)
        batch    a batched step of `parallel` tokens over the slots' N * S keys, beyond what the prompt
                 workspace already holds, + its allocator slack (another block-size pattern)

available_ram() is /proc/meminfo's MemAvailable (None where unreadable: no check); free_vram(device) is
torch.cuda.mem_get_info's free bytes. Tests monkeypatch both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from hotexperts.engine.presets import preset_config
from hotexperts.errors import HotExpertsError
from hotexperts.experts.budget import GiB, MiB
from hotexperts.experts.placement import Placement
from hotexperts.kernels.deltanet import chunk_workspace_bytes
from hotexperts.kernels.gpu_moe import DEQUANT_CHUNK_BYTES
from hotexperts.loading.gguf_reader import GGUFFile
from hotexperts.loading.safetensors_dir import SafetensorsDir
from hotexperts.models import get_arch
from hotexperts.models.cache import cache_bytes
from hotexperts.models.transformer import MoETransformer

PRESET_PREFIX = "preset:"
MEMINFO = Path("/proc/meminfo")
# bytes per expert parameter of each store format (experts/placement.QUANT's values; None = the dtype)
FORMAT_BYTES = {"int8": 1.0 + 4 / 1024, "int4g32": 0.5 + 4 / 32, "int8g32": 1.0 + 2 / 32,
                "int8g16": 1.0 + 4 / 32, "q4_k": 144 / 256}
# The caching allocator's slack beyond live tensors, per memory pool (the regular one, each CUDA graph pool):
# it rounds blocks of 1 MiB and more up to 2 MiB and keeps small tensors in 2 MiB segments, and a freed block
# serves a later request only if that one fits in it. Measured (torch's reserved peak - allocated peak):
# 0.25-0.26 GiB with two pools (prompt + the T=1 decode graph; run 23, budgets 2.4-17.4 GiB: it does not grow
# with the budget), 0.53 GiB with four patterns (+ the verify graphs' pool and batched eager steps, run 24).
ALLOCATOR_SLACK = 128 * MiB
CUBLAS_STREAM_BYTES = 32 * MiB   # torch's default cuBLAS workspace per stream (H100, torch 2.13; run 23)
CAPTURE_STREAMS_MAX = 33         # torch's side streams come from a pool of 32, + the shared capture stream


@dataclass(frozen=True)
class MemoryNeed:
    source: str
    experts: int                 # every routed expert, in its store format
    dense: int                   # the model's own weights (attention, norms, embeddings, routers)
    kv: int                      # the decode cache at the context asked for
    gpu_experts: int             # the experts the placement puts in VRAM (0 on CPU)
    layer_experts: int           # one MoE layer's experts (for the --n-cpu-moe suggestion)
    on_cuda: bool
    steps: int = 0               # the batched / verify steps' memory (feature_bytes; on CUDA)

    @property
    def ram(self) -> int:
        return self.experts if self.on_cuda else self.experts + self.dense + self.kv

    @property
    def vram(self) -> int:
        return self.dense + self.kv + self.steps + self.gpu_experts if self.on_cuda else 0


def available_ram() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none: then RAM is not checked)."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_vram(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def check_before_load(source: str, dtype: torch.dtype, device: torch.device, placement=None, *,
                      max_context: int | None = None, default_context: int = 4096,
                      expert_format: str | None = None, parallel: int = 1,
                      verify_tokens: int = 0) -> MemoryNeed | None:
    """memory_need + check_memory against this machine (the call Engine.load and bench make)."""
    need = memory_need(source, dtype, device, placement, max_context=max_context,
                       default_context=default_context, expert_format=expert_format, parallel=parallel,
                       verify_tokens=verify_tokens)
    if need is not None:
        check_memory(need, available_ram(), free_vram(device))
    return need


def memory_need(source: str, dtype: torch.dtype, device: torch.device, placement=None, *,
                max_context: int | None = None, default_context: int = 4096,
                expert_format: str | None = None, parallel: int = 1,
                verify_tokens: int = 0) -> MemoryNeed | None:
    """What loading `source` will take (module doc); None when no size can be read up front. parallel:
    sequence slots of the KV cache; verify_tokens: the longest verify step (0 = none)."""
    source = str(source)
    if source.endswith(".gguf"):
        return _gguf_need(source, device, placement)
    cfg = _config(source)
    if cfg is None:
        return None
    per_param = FORMAT_BYTES.get(expert_format, dtype.itemsize)
    layer = math.ceil(cfg.num_experts * cfg.expert_params * per_param)
    ctx = max_context or min(cfg.max_position_embeddings, default_context)
    cuda = device.type == "cuda"
    steps = feature_bytes(cfg, dtype, ctx, parallel=parallel, verify_tokens=verify_tokens,
                          quantized_cuda=cuda and expert_format is not None)     # graphs: the plan's part
    return _need(source, cfg, layer, dense_params(cfg) * dtype.itemsize,
                 cache_bytes(cfg, ctx, dtype, parallel), device, placement, sum(steps.values()))


def _need(source, cfg, layer: int, dense: int, kv: int, device, placement, steps: int = 0) -> MemoryNeed:
    cuda = device.type == "cuda"
    gpu = _gpu_expert_bytes(placement, len(cfg.moe_layers), cfg.num_experts, layer) if cuda else 0
    return MemoryNeed(source, layer * len(cfg.moe_layers), dense, kv, gpu, layer, cuda, steps)


def step_activation_bytes(cfg, dtype: torch.dtype, T: int, S: int) -> int:
    """A bound on the transient GPU memory of one T-token forward over S cached keys (the dequantize chunk
    of quantized experts aside): the residual stream and norms (12 fp32 [T, D]), q/k/v and their roped
    copy, the attention scores of SDPA's math fallback ([H, T, S] fp32 + two copies in the dtype, and K, V
    repeated to H heads for GQA; the fused backends need none), the largest dense projection dequantized
    for a prompt (kernels/qlinear; a dense MLP's only where some layer has one), the MoE pass's per-pair
    buffers, router logits, a DeltaNet layer's chunked temporaries, last-token logits."""
    a = dtype.itemsize
    D, K, I, E = cfg.hidden_size, cfg.top_k, cfg.moe_intermediate_size, cfg.num_experts
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hidden = T * D * 4 * 12
    scores = H * T * S * (4 + 2 * a) + (2 * H * S * hd * a if H != Hkv else 0)     # + GQA's repeated K, V
    attention = T * (H + 2 * Hkv) * hd * a * 3 + scores
    dense_mlp = cfg.intermediate_size if len(cfg.moe_layers) < cfg.num_layers else 0   # no dense MLP layer
    widest = max((H + 2 * Hkv) * hd, 2 * dense_mlp, 2 * cfg.shared_expert_intermediate_size)
    dense = widest * D * a
    moe = T * K * I * a * 3 + T * K * D * 4 + T * E * 4
    act = hidden + attention + dense + moe + cfg.vocab_size * 8
    if cfg.linear_layers:                          # a Gated DeltaNet layer's chunked form (and its q|k|v|z)
        s = cfg.linear
        act += chunk_workspace_bytes(T, s.num_value_heads, s.key_head_dim, s.value_head_dim)
        act += T * (s.conv_dim + s.num_value_heads * s.value_head_dim) * a * 3
    return act


def feature_bytes(cfg, dtype: torch.dtype, max_context: int, *, parallel: int = 1, verify_tokens: int = 0,
                  graphs: bool = False, quantized_cuda: bool = False, prompt_chunk: int = 512,
                  cublas_stream: int = CUBLAS_STREAM_BYTES) -> dict:
    """The step memory beyond the prompt workspace (module doc): {"graphs", "verify", "batch"}, the parts
    that apply (no key for a feature that is off). cublas_stream: one stream's cuBLAS workspace (0 with
    CUBLAS_WORKSPACE_CONFIG=:0:0)."""
    if parallel < 1 or verify_tokens < 0:
        raise HotExpertsError(f"sequence slots (-np/--parallel) must be >= 1 and verify tokens >= 0, got "
                              f"{parallel} and {verify_tokens}")
    verify = verify_tokens >= 2
    parts = {}
    if graphs:
        buckets = 1 + (verify_tokens - 1 if verify else 0)         # T=1, then each T in 2..verify_tokens
        streams = min(CAPTURE_STREAMS_MAX, 1 + buckets)             # a warm-up side stream each + capture's
        parts["graphs"] = (1 + verify) * ALLOCATOR_SLACK + streams * cublas_stream
    if verify:
        chunk = DEQUANT_CHUNK_BYTES if quantized_cuda else 0
        parts["verify"] = step_activation_bytes(cfg, dtype, verify_tokens, max_context) + chunk
    if parallel > 1:
        step = step_activation_bytes(cfg, dtype, parallel, parallel * max_context)
        prompt = step_activation_bytes(cfg, dtype, min(prompt_chunk, max_context), max_context)
        parts["batch"] = max(0, step - prompt) + ALLOCATOR_SLACK
    return parts


def _config(source: str):
    """The ModelConfig of a preset or an HF directory, read without weights (None: not readable here)."""
    try:
        if source.startswith(PRESET_PREFIX):
            hf = preset_config(source[len(PRESET_PREFIX):])
        else:
            hf = SafetensorsDir(source).config            # config.json and the safetensors headers only
        return get_arch(hf.get("model_type")).config_from_hf(hf)
    except (HotExpertsError, OSError, KeyError, TypeError, ValueError):
        return None                                   # the loader names what is wrong with the source


def dense_params(cfg) -> int:
    """The model's own parameters and buffers (everything but the routed experts), counted on the meta
    device."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def _gguf_need(path: str, device, placement) -> MemoryNeed | None:
    try:
        f = GGUFFile(path)                                # the header, memory-mapped: nothing is read
        sizes = {name: int(f.raw(name).nbytes) for name in f.names()}
    except (HotExpertsError, OSError, KeyError, TypeError, ValueError):
        return None
    experts = sum(v for k, v in sizes.items() if "_exps" in k)
    dense = sum(sizes.values()) - experts
    moe_layers = max(1, len({k.split(".")[1] for k in sizes if "_exps" in k and k.startswith("blk.")}))
    layer = experts // moe_layers
    cuda = device.type == "cuda"
    gpu = _gpu_expert_bytes(placement, moe_layers, None, layer) if cuda else 0
    return MemoryNeed(path, experts, dense, 0, gpu, layer, cuda)


def _gpu_expert_bytes(placement, moe_layers: int, num_experts: int | None, layer: int) -> int:
    """The experts a placement asks to keep in VRAM by itself (module doc); 0 where the budget sizes it."""
    p = placement if placement is not None else Placement()
    if p.vram_budget is not None and p.mode != "gpu":
        return 0
    if p.mode == "gpu":
        return layer * moe_layers
    if p.mode == "layers" and p.n_cpu_layers is not None:
        return layer * max(0, moe_layers - p.n_cpu_layers)
    if p.mode == "hot" and p.hot_k and num_experts:
        return layer * moe_layers * min(p.hot_k, num_experts) // num_experts
    if p.mode == "cache" and p.cache_bytes is not None:
        return p.cache_bytes
    return 0


def check_memory(need: MemoryNeed, ram: int | None, vram: int | None) -> None:
    """One HotExpertsError naming what does not fit, by how much, and what to change."""
    if ram is not None and need.ram > ram:
        raise HotExpertsError(_ram_message(need, ram))
    if vram is not None and need.vram > vram:
        raise HotExpertsError(_vram_message(need, vram))


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _ram_message(need: MemoryNeed, ram: int) -> str:
    parts = f"experts {_gib(need.experts)}" + ("" if need.on_cuda else
                                               f" + dense {_gib(need.dense)} + KV cache {_gib(need.kv)}")
    return (f"not enough RAM to load {need.source}: it needs {_gib(need.ram)} ({parts}) and this machine has "
            f"{_gib(ram)} available. Use a smaller model (a *-mini or tiny-* preset: `hotexperts make-model "
            f"--help` lists them), a quantized GGUF (Q4_K experts stay 4.5-bit in RAM), --dtype bfloat16 "
            f"instead of float32, or --expert-quant int4 in bench")


def _vram_message(need: MemoryNeed, vram: int) -> str:
    steps = f" + batched/verify steps {_gib(need.steps)}" if need.steps else ""
    head = (f"not enough free VRAM for {need.source}: it needs {_gib(need.vram)} (dense {_gib(need.dense)} + "
            f"KV cache {_gib(need.kv)}{steps} + experts on the GPU {_gib(need.gpu_experts)}) and the GPU "
            f"has {_gib(vram)} free")
    over = need.vram - vram
    if over > need.gpu_experts:
        fewer = ", fewer -np slots or shorter drafts" if need.steps else ""
        return (f"{head}; even with every expert on the CPU the dense part does not fit: shorten the context "
                f"(-c N){fewer}, --dense-quant q8, or --device cpu")
    layers = math.ceil(over / max(1, need.layer_experts))
    return (f"{head}. Keep some experts on the CPU: --n-cpu-moe {layers} (the first {layers} MoE layers' "
            f"experts on the CPU), --moe-cache SIZE (a hot-expert cache that fits, e.g. --moe-cache auto), "
            f"or --cpu-moe")
