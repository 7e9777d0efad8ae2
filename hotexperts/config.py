"""Plain configuration data shared by every layer of the package (imports nothing of ours).

ModelConfig is the architecture-neutral description of an MoE decoder; each architecture module
builds one from its Hugging Face config.json (and later from GGUF metadata).
ExpertKey = (layer, expert): `layer` is the decoder-layer index (0-based, counting dense layers too),
`expert` the routed-expert id within that layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
