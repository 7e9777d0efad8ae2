"""The architectures' GGUF side without files: GGUFConfig over plain metadata, each architecture's
hf_from_gguf / gguf_metadata, the tensor hooks and the shared tensor names (file round trips:
tests/engine/test_gguf_load.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hotexperts.errors import ModelLoadError, UnsupportedArchitectureError
from hotexperts.models import ARCHITECTURES, get_arch
from hotexperts.models.gguf_config import GGUFConfig
from hotexperts.models.gguf_names import gguf_name, gguf_rename
from hotexperts.models.naming import ExpertRef


@dataclass
class Info:
    shape: tuple[int, ...]


class FakeGGUF:
    """Metadata and tensor shapes as a GGUF file of `cfg` would hold them (what GGUFConfig reads)."""

    path = Path("fake.gguf")

    def __init__(self, arch, cfg, **extra):
        a = arch.gguf_arch
        self.meta = {f"{a}.{k}": v for k, v in {
            "embedding_length": cfg.hidden_size, "block_count": cfg.num_layers,
            "expert_count": cfg.num_experts, "attention.head_count": cfg.num_heads,
            "attention.head_count_kv": cfg.num_kv_heads,
            "attention.key_length": cfg.head_dim, "expert_used_count": cfg.top_k,
            "rope.dimension_count": cfg.rotary_dim,
            "context_length": cfg.max_position_embeddings, "rope.freq_base": cfg.rope_theta,
            "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
            "feed_forward_length": cfg.intermediate_size,
            **arch.gguf_metadata(cfg), **extra}.items()}
        E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.shapes = {"token_embd.weight": (cfg.vocab_size, D), "output.weight": (cfg.vocab_size, D)}
        for l in cfg.moe_layers:
            self.shapes[f"blk.{l}.ffn_gate_inp.weight"] = (E, D)
            self.shapes[f"blk.{l}.ffn_gate_exps.weight"] = (E, I, D)
            if cfg.shared_expert_intermediate_size:
                self.shapes[f"blk.{l}.ffn_gate_shexp.weight"] = (cfg.shared_expert_intermediate_size, D)
        for l in cfg.attention_layers:                       # hybrid models: layer kinds from the tensors
            self.shapes[f"blk.{l}.attn_q.weight"] = (cfg.num_heads * cfg.head_dim, D)
        if cfg.attention_bias:
            self.shapes["blk.0.attn_q.bias"] = (cfg.num_heads * cfg.head_dim,)
        if cfg.qk_norm == "head":                            # GLM reads use_qk_norm from the tensors
            self.shapes["blk.0.attn_q_norm.weight"] = (cfg.head_dim,)

    def get(self, key, default=None):
        return self.meta.get(key, default)

    def __contains__(self, name):
        return name in self.shapes

    def info(self, name):
        return Info(self.shapes[name])


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_gguf_metadata_gives_back_the_config(model_type):
    arch = get_arch(model_type)
    cfg = arch.config_from_hf({**arch.tiny, "bos_token_id": None, "eos_token_id": None})
    extra = {"expert_weights_norm": cfg.norm_topk_prob} if model_type != "mixtral" else {}
    g = GGUFConfig(FakeGGUF(arch, cfg, **extra), arch.gguf_arch)
    assert (g.layers, g.num_experts, g.expert_width) == (cfg.num_layers, cfg.num_experts,
                                                         cfg.moe_intermediate_size)
    assert arch.config_from_gguf(g) == cfg
    assert arch.hf_from_gguf(g)["model_type"] == model_type


def test_gguf_defaults_are_the_architectures():
    """Keys a file lacks: llama.cpp's norm_topk default per architecture, config_from_hf's rope theta."""
    cases = [("qwen3_moe", True, 1e4), ("qwen2_moe", False, 1e4), ("olmoe", False, 1e4),
             ("mixtral", True, 1e6)]
    for model_type, norm, theta in cases:
        arch = get_arch(model_type)
        f = FakeGGUF(arch, arch.config_from_hf(arch.tiny))
        del f.meta[f"{arch.gguf_arch}.rope.freq_base"]
        cfg = arch.config_from_gguf(GGUFConfig(f, arch.gguf_arch))
        assert (cfg.norm_topk_prob, cfg.rope_theta) == (norm, theta), model_type


def test_gguf_config_errors():
    arch = get_arch("qwen3_moe")
    cfg = arch.config_from_hf(arch.tiny)
    f = FakeGGUF(arch, cfg)
    f.meta["qwen3moe.expert_count"] = 0
    with pytest.raises(UnsupportedArchitectureError, match="without experts"):
        GGUFConfig(f, "qwen3moe")
    f = FakeGGUF(arch, cfg)
    del f.meta["qwen3moe.expert_used_count"]
    with pytest.raises(ModelLoadError, match="lacks GGUF metadata/tensors: expert_used_count"):
        GGUFConfig(f, "qwen3moe")
    f = FakeGGUF(arch, cfg, **{"rope.dimension_count": cfg.head_dim // 2})
    with pytest.raises(ModelLoadError, match="partial rotary"):
        GGUFConfig(f, "qwen3moe").common()
    f = FakeGGUF(arch, cfg, **{"attention.head_count_kv": [2, 4, 2, 2]})
    with pytest.raises(ModelLoadError, match="varies across layers"):
        GGUFConfig(f, "qwen3moe").common()


def test_tensor_hooks():
    mixtral = get_arch("mixtral")
    cfg = mixtral.config_from_hf(mixtral.tiny)
    q = torch.randn(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(mixtral.to_gguf(cfg, name, q), q)
    assert torch.equal(mixtral.from_gguf(cfg, name, mixtral.to_gguf(cfg, name, q)), q)
    assert mixtral.to_gguf(cfg, "model.layers.0.self_attn.v_proj.weight", q) is q
    for model_type in ("qwen3_moe", "olmoe"):
        assert get_arch(model_type).from_gguf(cfg, name, q) is q
    gate = torch.randn(1, 8)
    qwen2 = get_arch("qwen2_moe")
    assert qwen2.to_gguf(cfg, "model.layers.0.mlp.shared_expert_gate.weight", gate).shape == (8,)


@pytest.mark.parametrize("ours, moe_block", [
    ("model.layers.3.self_attn.q_proj.weight", "mlp"), ("model.layers.3.mlp.gate.weight", "mlp"),
    ("model.layers.3.block_sparse_moe.gate.weight", "block_sparse_moe"), ("model.norm.weight", "mlp"),
    ("model.layers.0.mlp.shared_expert_gate.weight", "mlp"), ("lm_head.weight", "block_sparse_moe")])
def test_gguf_names_round_trip(ours, moe_block):
    assert gguf_rename(gguf_name(ours, moe_block), moe_block) == ours
    assert gguf_rename("blk.2.ffn_down_exps.weight") == ExpertRef(2, None, "down")
    assert gguf_rename("blk.2.ffn_up.5.weight") == ExpertRef(2, 5, "up")


@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "qwen3_next"])
def test_hybrid_gguf_without_ssm_metadata_is_one_clear_error(model_type):
    arch = get_arch(model_type)
    cfg = arch.config_from_hf(arch.tiny)
    fake = FakeGGUF(arch, cfg)
    del fake.meta[f"{arch.gguf_arch}.ssm.time_step_rank"]
    with pytest.raises(ModelLoadError, match="ssm.time_step_rank"):
        arch.config_from_gguf(GGUFConfig(fake, arch.gguf_arch))


def test_hybrid_gguf_mtp_blocks_are_not_decoder_layers():
    arch = get_arch("qwen3_5_moe")
    cfg = arch.config_from_hf(arch.tiny)
    fake = FakeGGUF(arch, cfg, nextn_predict_layers=1)
    fake.meta["qwen35moe.block_count"] = cfg.num_layers + 1
    fake.shapes[f"blk.{cfg.num_layers}.ffn_gate_inp.weight"] = fake.shapes["blk.0.ffn_gate_inp.weight"]
    g = GGUFConfig(fake, "qwen35moe")
    assert g.layers == cfg.num_layers and g.moe_layers == list(cfg.moe_layers)
    assert arch.config_from_gguf(g).layer_types == cfg.layer_types
