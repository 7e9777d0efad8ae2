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
class ModelConfig:
    model_type: str                     # "qwen3_moe" | "qwen2_moe" | "mixtral" | "olmoe"
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
    extra: dict = field(default_factory=dict, compare=False, hash=False)

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
