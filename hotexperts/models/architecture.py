"""Architecture: what one supported model family declares, as one frozen value in its own file.

    ARCH = Architecture(model_type="qwen3_moe", gguf_arch="qwen3moe", config_from_hf=..., rename=..., ...)

    model_type          Hugging Face config.json "model_type"
    gguf_arch           GGUF "general.architecture" read and written (llama.cpp's name: Mixtral is "llama")
    config_from_hf(d)   -> ModelConfig: the one constructor of a ModelConfig, whatever the source
    rename(hf_name)     -> str | ExpertRef | None: HF tensor names -> ours (models/naming.py)
    moe_block           our module name of the MoE block, HF's on-disk spelling: "mlp" (Mixtral:
                        "block_sparse_moe")
    hf_expert_names     the per-expert HF matrix names (gate, up, down), e.g. Mixtral's (w1, w3, w2)
    tiny                the HF config dict of the architecture's tiny preset (a few MB: tests and the demo)

The registry (models/__init__.py) keys these by model_type and by gguf_arch; nothing else in the package
branches on an architecture's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hotexperts.config import ModelConfig
from hotexperts.models.naming import Renamer

TINY_VOCAB = 1024          # the tiny presets' vocabulary (engine/presets.py trains a BPE of this size)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    gguf_arch: str
    config_from_hf: Callable[[dict], ModelConfig]
    rename: Renamer
    moe_block: str = "mlp"
    hf_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    tiny: dict = field(default_factory=dict, compare=False, hash=False)


def tiny_hf_config(model_type: str, hf_class: str, **kw) -> dict:
    """An HF config dict at the tiny presets' widths (hidden 128, 4 layers, 4 heads of 32), `kw` on top."""
    base = {"architectures": [hf_class], "model_type": model_type, "hidden_act": "silu", "hidden_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "intermediate_size": 256, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": TINY_VOCAB,
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16"}
    return {**base, **kw}
