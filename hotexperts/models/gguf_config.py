"""GGUF metadata -> the HF-style config.json fields every architecture reads the same way.

    g = GGUFConfig(f, "qwen3moe")      f: anything with get(key, default), `tensor in f`, info(tensor).shape
                                       and path (loading/gguf_reader.GGUFFile); models/ reads no files
    g.key("expert_used_count", default)   f.get("qwen3moe.expert_used_count", default)
    g.has(tensor), g.rows(tensor)      the tensor is present; its first dimension (torch order)
    g.layers, g.moe_layers             decoder blocks (block_count less the nextn_predict_layers MTP blocks
                                       llama.cpp appends); those with a router (blk.N.ffn_gate_inp.weight)
    g.num_experts, g.expert_width      E (the router's rows), I (one expert's gate rows)
    g.common(partial_rope=False)       sizes, heads, vocab, context, norm eps, rope, bos/eos: HF key names
                                       (partial_rope: partial_rotary_factor = rope.dimension_count / hd)

An architecture's hf_from_gguf(g) is g.common() plus its own keys (models/<arch>.py); its config_from_hf
then builds the ModelConfig, the one path from any source to a ModelConfig. A key missing from the file is
left out where config_from_hf has the architecture's default (rope_theta). Missing metadata or tensors, a
dense model (no expert_count), no MoE layer and partial rotary raise ModelLoadError (or
UnsupportedArchitectureError).
"""

from __future__ import annotations

from hotexperts.errors import ModelLoadError, UnsupportedArchitectureError
from hotexperts.models.gguf_names import expert_tensors

REQUIRED = ("embedding_length", "block_count", "attention.head_count", "expert_used_count")


class GGUFConfig:
    def __init__(self, f, arch: str):
        self.f, self.arch = f, arch
        if not self.key("expert_count"):
            raise UnsupportedArchitectureError(f"GGUF architecture {arch!r} without experts (a dense model) "
                                               "is not supported: this engine runs MoE models")
        need = [k for k in REQUIRED if self.key(k) is None]
        if need or not self.has("token_embd.weight"):
            raise ModelLoadError(f"{f.path.name} lacks GGUF metadata/tensors: "
                                 f"{', '.join(need) or 'token_embd'}")
        self.layers = int(self.key("block_count")) - int(self.key("nextn_predict_layers") or 0)
        self.moe_layers = [i for i in range(self.layers) if self.has(f"blk.{i}.ffn_gate_inp.weight")]
        if not self.moe_layers:
            raise ModelLoadError(f"{f.path.name} has no MoE layers (no blk.N.ffn_gate_inp.weight router)")
        self.num_experts = self.rows(f"blk.{self.moe_layers[0]}.ffn_gate_inp.weight")
        names, _ = expert_tensors(f, self.moe_layers[0], "gate", self.num_experts)
        self.expert_width = int(f.info(names[0]).shape[-2])

    def key(self, name: str, default=None):
        return self.f.get(f"{self.arch}.{name}", default)

    def has(self, tensor: str) -> bool:
        return tensor in self.f

    def rows(self, tensor: str) -> int:
        return int(self.f.info(tensor).shape[0])

    def common(self, partial_rope: bool = False) -> dict:
        D, H = int(self.key("embedding_length")), one(self.key("attention.head_count"), "head_count")
        tok = lambda key: self.f.get(f"tokenizer.ggml.{key}")  # noqa: E731
        d = {"hidden_act": "silu", "hidden_size": D, "num_hidden_layers": self.layers,
             "num_attention_heads": H,
             "num_key_value_heads": one(self.key("attention.head_count_kv", H), "head_count_kv"),
             "head_dim": int(self.key("attention.key_length") or D // H),
             "num_experts_per_tok": int(self.key("expert_used_count")),
             "vocab_size": self.rows("token_embd.weight"),
             "max_position_embeddings": int(self.key("context_length", 4096)),
             "tie_word_embeddings": not self.has("output.weight"),
             "rms_norm_eps": float(self.key("attention.layer_norm_rms_epsilon", 1e-6)),
             "bos_token_id": tok("bos_token_id"), "eos_token_id": tok("eos_token_id")}
        if self.key("rope.freq_base") is not None:
            d["rope_theta"] = float(self.key("rope.freq_base"))
        return {**d, **self._rope(d["head_dim"], partial_rope)}

    def _rope(self, head_dim: int, partial: bool) -> dict:
        rot = self.key("rope.dimension_count")
        if partial:
            return {"partial_rotary_factor": int(rot if rot is not None else head_dim) / head_dim}
        if rot is not None and int(rot) != head_dim:
            raise ModelLoadError(f"partial rotary embedding (rope.dimension_count {rot} < head_dim "
                                 f"{head_dim}) is not supported")
        kind = self.key("rope.scaling.type")                     # config_from_hf names it in its error
        return {} if kind in (None, "none") else {"rope_scaling": {"rope_type": kind}}


def one(v, what: str) -> int:
    """A per-layer array that must hold one value (e.g. head_count_kv), or a scalar."""
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise ModelLoadError(f"GGUF {what} varies across layers ({sorted(set(v))}); not supported")
        v = v[0]
    return int(v)
