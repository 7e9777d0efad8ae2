"""Plain configuration data shared by every layer of the package (imports only hotexperts.errors).

ModelConfig is the architecture-neutral description of an MoE decoder; each architecture module
builds one from its Hugging Face config.json (and later from GGUF metadata).
ExpertKey = (layer, expert): `layer` is the decoder-layer index (0-based, counting dense layers too),
`expert` the routed-expert id within that layer.
KernelOptions: how the expert kernels run (threads, integer path, backends), passed down from the flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hotexperts.errors import HotExpertsError

ExpertKey = tuple[int, int]


@dataclass(frozen=True)
class LinearAttentionShape:
    """A Gated DeltaNet layer's shape: Hk query/key heads of dk, Hv value heads of dv (Hv a multiple of
    Hk), a depthwise causal conv1d of `conv_kernel` taps over the q|k|v channels."""

    num_key_heads: int                  # Hk
    num_value_heads: int                # Hv
    key_head_dim: int                   # dk
    value_head_dim: int                 # dv
    conv_kernel: int                    # Kc

    @property
    def conv_dim(self) -> int:
        """Channels of the conv (q, k and v concatenated): 2 Hk dk + Hv dv."""
        return 2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim


@dataclass(frozen=True)
class YarnRope:
    """YaRN RoPE scaling (transformers' _compute_yarn_parameters): inv_freq blends interpolated (/ factor)
    and extrapolated frequencies over a linear ramp between the beta_fast / beta_slow correction dims;
    cos and sin are scaled by attention_factor (None: 0.1 ln(factor) + 1)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    model_type: str                     # "qwen3_moe" | "qwen2_moe" | "mixtral" | "olmoe" | "qwen3_5_moe" ...
    vocab_size: int
    hidden_size: int                    # D
    num_layers: int                     # L
    num_heads: int                      # H
    num_kv_heads: int                   # Hkv
    head_dim: int                       # hd
    num_experts: int                    # E routed experts per MoE layer
    top_k: int                          # K experts per token
    moe_intermediate_size: int          # I, per routed expert
    moe_layers: tuple[int, ...]         # decoder-layer indices that are MoE (others are dense MLP)
    intermediate_size: int = 0          # dense-MLP width for non-MoE layers
    norm_topk_prob: bool = True         # renormalise the K routing weights to sum to 1
    shared_expert_intermediate_size: int = 0   # qwen2_moe shared expert (sigmoid-gated); 0 = none
    qk_norm: str = "none"               # "none" | "head" (qwen3: per head) | "full" (olmoe: over H*hd)
    attention_bias: bool = False        # qkv bias (qwen2_moe)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    clip_qkv: float | None = None       # olmoe
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # hybrid linear-attention models (Qwen3.5-MoE, Qwen3-Next); the defaults describe every other family
    layer_types: tuple[str, ...] = ()   # per layer "full_attention" | "linear_attention"; () = all attention
    linear: LinearAttentionShape | None = None   # the Gated DeltaNet layers' shape
    partial_rotary_factor: float = 1.0  # RoPE on the first int(hd * factor) dims of each head
    attn_output_gate: bool = False      # q_proj also yields a per-head gate: o = attn * sigmoid(gate)
    zero_centered_norm: bool = False    # RMSNorm scales by (1 + w) (weights stored zero-centred)
    # GPT-OSS / GLM-4.5 variants; the defaults describe every other family
    rope_yarn: YarnRope | None = None   # YaRN-scaled RoPE (GPT-OSS)
    attention_sinks: bool = False       # a learned per-head logit in every softmax (GPT-OSS `sinks` [H])
    router: str = "softmax"             # "softmax" (top-k of softmax) | "sigmoid_group" (GLM / DeepSeek-V3)
    router_bias: bool = False           # the router Linear has a bias (GPT-OSS)
    n_group: int = 1                    # sigmoid_group: expert groups, the topk_group best of them kept
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # sigmoid_group: the top-k weights are multiplied by it
    shared_expert_gated: bool = True    # qwen2_moe's sigmoid gate on the shared expert; False: GLM's
    expert_act: str = "silu"            # weights.ExpertAct kind: "silu" | "swiglu_oai" (GPT-OSS)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False           # routed experts carry gate/up and down biases (GPT-OSS)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def is_sliding(self, layer: int) -> bool:
        """Does layer `layer` attend within cfg.sliding_window only (layer_types "sliding_attention")?"""
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    @property
    def mixed_windows(self) -> bool:
        """Some layers slide and some attend fully (GPT-OSS): the model builds both masks."""
        return any(self.is_sliding(i) for i in range(self.num_layers))

    def is_linear(self, layer: int) -> bool:
        """Is decoder layer `layer` a linear-attention (Gated DeltaNet) layer rather than attention?"""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if not self.is_linear(i))

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_linear(i))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def expert_nbytes(self, bytes_per_param: float = 2.0) -> int:
        return int(self.expert_params * bytes_per_param)


CPU_ISAS = {"native": (), "avx2": ("-mno-avx512f",), "scalar": ("-mno-avx",)}   # CPU extension builds
GPU_MOE_BACKENDS = ("auto", "triton", "torch")
STAGE_COPY_MODES = ("auto", "memcpy", "gather")


@dataclass(frozen=True)
class KernelOptions:
    """How the expert kernels run: one frozen value built from flags and passed down (no env vars, no
    module globals). The defaults are what a user gets without flags.

    cpu_threads    OpenMP threads of the CPU expert kernel; None = physical cores, one fewer beside a GPU
                   (the thread that drives the GPU needs a core of its own)
    act_quant      CPU integer path for int8/int4/int8gG weights (int8 activations); None = auto (on where
                   the build has an integer dot), False = the exact fp32 path
    prefetch_rows  CPU integer path: software prefetch this many weight steps ahead (0 = off)
    cpu_isa        which build of the CPU extension: "native" (-march=native), "avx2" (no AVX-512), "scalar"
    gpu_moe        GPU expert kernel backend: "auto" (Triton where it applies), "triton", "torch"
    stage_copy     prompt staging copies: "auto", "memcpy" (cudaMemcpyAsync per run), "gather" (one launch)
    """

    cpu_threads: int | None = None
    act_quant: bool | None = None
    prefetch_rows: int = 2
    cpu_isa: str = "native"
    gpu_moe: str = "auto"
    stage_copy: str = "auto"

    def __post_init__(self):
        checks = (("cpu_isa", self.cpu_isa, tuple(CPU_ISAS)), ("gpu_moe", self.gpu_moe, GPU_MOE_BACKENDS),
                  ("stage_copy", self.stage_copy, STAGE_COPY_MODES))
        for name, value, allowed in checks:
            if value not in allowed:
                raise HotExpertsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise HotExpertsError(f"the CPU thread count must be >= 1, got {self.cpu_threads}")
        if self.prefetch_rows < 0:
            raise HotExpertsError(f"prefetch_rows must be >= 0, got {self.prefetch_rows}")

    def threads(self, beside_gpu: bool = False) -> int:
        """The CPU kernel's thread count (cpu_threads, else physical cores, minus one beside a GPU)."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        n = physical_cores()
        return n - 1 if beside_gpu and n > 1 else n

    def use_act_quant(self) -> bool:
        return self.act_quant is not False


DEFAULT_KERNELS = KernelOptions()


def physical_cores() -> int:
    """Physical CPU cores (hyperthreads counted once), from /proc/cpuinfo; os.cpu_count() elsewhere."""
    try:
        cores, phys = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                cores.add((phys, line.split(":")[1].strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1
