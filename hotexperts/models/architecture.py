"""Architecture: what one supported model family declares, as one frozen value in its own file.

    ARCH = Architecture(model_type="qwen3_moe", gguf_arch="qwen3moe", config_from_hf=..., rename=..., ...)

    model_type          Hugging Face config.json "model_type"
    gguf_arch           GGUF "general.architecture" read and written (llama.cpp's name: Mixtral is "llama")
    config_from_hf(d)   -> ModelConfig: the one constructor of a ModelConfig, whatever the source
    hf_from_gguf(g)     -> HF-style config dict from GGUF metadata (g: models/gguf_config.GGUFConfig), so
                           config_from_gguf(g) = config_from_hf(hf_from_gguf(g))
    gguf_metadata(cfg)  -> {key: int | float | bool | str | list}: the architecture's own `{gguf_arch}.*` keys
                           a GGUF writer adds
    from_gguf(cfg, name, w) / to_gguf(cfg, name, t)   one dense tensor (our name) as read from / written to
                           a GGUF: Mixtral undoes / applies llama.cpp's Q/K row permutation
    from_hf(cfg, hf_name, t)  one HF checkpoint tensor as our layout wants it, before it is copied (GPT-OSS:
                           its [E, D, 2I] gate_up with interleaved gate/up columns -> [E, 2I, D] gate rows
                           then up rows); default unchanged
    rename(hf_name)     -> str | ExpertRef | None: HF tensor names -> ours; by default
                           naming.make_rename(moe_block, hf_expert_names), or the architecture's own
    moe_block           our module name of the MoE block, HF's on-disk spelling: "mlp" (Mixtral:
                        "block_sparse_moe")
    hf_expert_names     the per-expert HF matrix names (gate, up, down), e.g. Mixtral's (w1, w3, w2)
    gguf_names          the architecture's own per-layer GGUF names {GGUF "part.kind": our "module.param"}
                        (models/gguf_names.py), looked up before the shared table
    aliases             further HF model_types served (Qwen3.5-MoE: the text model's "qwen3_5_moe_text")
    tiny                the HF config dict of the architecture's tiny preset (a few MB: tests and the demo)

The registry (models/__init__.py) keys these by model_type and by gguf_arch; no model, loader or writer
code elsewhere branches on an architecture's name (engine/load_gguf.py and gguf_export.py ask the
Architecture).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hotexperts.config import ModelConfig
from hotexperts.models.gguf_config import GGUFConfig
from hotexperts.models.naming import Renamer, make_rename

TINY_VOCAB = 1024          # the tiny presets' vocabulary (engine/presets.py trains a BPE of this size)
TensorHook = Callable[[ModelConfig, str, torch.Tensor], torch.Tensor]     # (cfg, our name, tensor) -> tensor


def unchanged(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return t


def no_metadata(cfg: ModelConfig) -> dict[str, int | float]:
    return {}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    gguf_arch: str
    config_from_hf: Callable[[dict], ModelConfig]
    hf_from_gguf: Callable[[GGUFConfig], dict]
    rename: Renamer | None = None
    moe_block: str = "mlp"
    hf_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    gguf_metadata: Callable[[ModelConfig], dict[str, int | float]] = no_metadata
    from_gguf: TensorHook = unchanged
    to_gguf: TensorHook = unchanged
    from_hf: TensorHook = unchanged
    gguf_names: dict = field(default_factory=dict, compare=False, hash=False)
    aliases: tuple[str, ...] = ()
    tiny: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.rename is None:                       # the names it declares are all rename() needs
            object.__setattr__(self, "rename", make_rename(self.moe_block, self.hf_expert_names))

    def config_from_gguf(self, g: GGUFConfig) -> ModelConfig:
        return self.config_from_hf(self.hf_from_gguf(g))


def tiny_hf_config(model_type: str, hf_class: str, **kw) -> dict:
    """An HF config dict at the tiny presets' widths (hidden 128, 4 layers, 4 heads of 32), `kw` on top."""
    base = {"architectures": [hf_class], "model_type": model_type, "hidden_act": "silu", "hidden_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "intermediate_size": 256, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": TINY_VOCAB,
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16"}
    return {**base, **kw}
