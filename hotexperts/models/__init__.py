"""Model definitions: one pure MoETransformer, one file per architecture, and the registry that picks one.

    ARCHITECTURES[model_type]      -> Architecture (models/architecture.py) declared by qwen3_moe.py, ...
    ALIASES[model_type]            -> further HF model_types an Architecture serves (its `aliases`)
    GGUF_ARCHITECTURES[gguf_arch]  -> the same objects, keyed by GGUF general.architecture
    get_arch(model_type)           -> Architecture; unknown -> UnsupportedArchitectureError listing supported
    get_gguf_arch(gguf_arch)       -> Architecture; the same error for a GGUF architecture
    config_from_hf(d)              -> ModelConfig, dispatching on d["model_type"]
    split_state_dict, assemble_layer  (models/split.py)
Adding an architecture: one file declaring ARCH = Architecture(...), plus its entry in _ALL below.
"""

from __future__ import annotations

from hotexperts.config import ModelConfig
from hotexperts.errors import UnsupportedArchitectureError
from hotexperts.models import glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_5_moe, qwen3_moe, qwen3_next
from hotexperts.models.architecture import Architecture
from hotexperts.models.naming import ExpertRef
from hotexperts.models.split import assemble_layer, split_state_dict

__all__ = ["ARCHITECTURES", "GGUF_ARCHITECTURES", "Architecture", "ExpertRef", "assemble_layer",
           "config_from_hf", "get_arch", "get_gguf_arch", "split_state_dict"]

_ALL = (qwen3_moe.ARCH, qwen2_moe.ARCH, mixtral.ARCH, olmoe.ARCH, qwen3_5_moe.ARCH, qwen3_next.ARCH,
        gpt_oss.ARCH, glm4_moe.ARCH)
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in _ALL}
ALIASES: dict[str, Architecture] = {t: a for a in _ALL for t in a.aliases}
GGUF_ARCHITECTURES: dict[str, Architecture] = {a.gguf_arch: a for a in _ALL}


def get_arch(model_type: str | None) -> Architecture:
    if model_type in ALIASES:
        return ALIASES[model_type]
    return _lookup(ARCHITECTURES, model_type, "model_type")


def get_gguf_arch(gguf_arch: str | None) -> Architecture:
    return _lookup(GGUF_ARCHITECTURES, gguf_arch, "GGUF architecture")


def config_from_hf(d: dict) -> ModelConfig:
    return get_arch(d.get("model_type")).config_from_hf(d)


def _lookup(table: dict[str, Architecture], name: str | None, what: str) -> Architecture:
    if name not in table:
        raise UnsupportedArchitectureError(
            f"{what} {name!r} is not supported; supported: {', '.join(sorted(table))}")
    return table[name]
