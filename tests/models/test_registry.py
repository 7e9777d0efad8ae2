"""The architecture registry: one Architecture per file, keyed by HF model_type and by GGUF architecture."""

from __future__ import annotations

import dataclasses

import pytest

from hotexperts.errors import UnsupportedArchitectureError
from hotexperts.models import (
    ARCHITECTURES,
    GGUF_ARCHITECTURES,
    config_from_hf,
    get_arch,
    get_gguf_arch,
    glm4_moe,
    gpt_oss,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
)
from hotexperts.models.transformer import MoETransformer

FILES = {"qwen3_moe": qwen3_moe, "qwen2_moe": qwen2_moe, "mixtral": mixtral, "olmoe": olmoe,
         "qwen3_5_moe": qwen3_5_moe, "qwen3_next": qwen3_next, "gpt_oss": gpt_oss, "glm4_moe": glm4_moe}
GGUF = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe",
        "qwen3_5_moe": "qwen35moe", "qwen3_next": "qwen3next", "gpt_oss": "gpt-oss", "glm4_moe": "glm4moe"}


def test_each_file_declares_one_architecture_found_by_both_keys():
    assert sorted(ARCHITECTURES) == sorted(FILES)
    for model_type, module in FILES.items():
        arch = module.ARCH
        assert arch.model_type == model_type and arch.gguf_arch == GGUF[model_type]
        assert get_arch(model_type) is arch and get_gguf_arch(arch.gguf_arch) is arch
    assert GGUF_ARCHITECTURES == {a.gguf_arch: a for a in ARCHITECTURES.values()}
    assert get_arch("qwen3_5_moe_text") is qwen3_5_moe.ARCH          # the text model's own model_type
    with pytest.raises(dataclasses.FrozenInstanceError):
        qwen3_moe.ARCH.moe_block = "ffn"


@pytest.mark.parametrize("model_type", sorted(FILES))
def test_tiny_config_builds_a_model_with_the_arch_moe_block(model_type):
    arch = get_arch(model_type)
    cfg = arch.config_from_hf(arch.tiny)
    assert cfg.model_type == model_type and config_from_hf(arch.tiny) == cfg
    layer = MoETransformer(cfg).model.layers[cfg.moe_layers[0]]
    assert hasattr(layer, arch.moe_block) and layer.ffn_name == arch.moe_block
    assert (arch.moe_block == "block_sparse_moe") == (model_type == "mixtral")


@pytest.mark.parametrize("lookup, name, known", [
    (get_arch, "llama", ARCHITECTURES), (get_arch, None, ARCHITECTURES),
    (get_gguf_arch, "gpt2", GGUF_ARCHITECTURES), (get_gguf_arch, "qwen3_moe", GGUF_ARCHITECTURES)])
def test_unknown_names_raise_one_error_listing_the_supported(lookup, name, known):
    with pytest.raises(UnsupportedArchitectureError) as e:
        lookup(name)
    msg = str(e.value)
    assert f"{name!r} is not supported; supported: {', '.join(sorted(known))}" in msg
