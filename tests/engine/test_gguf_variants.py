"""GPT-OSS and GLM-4.5 GGUFs from our writer: the loader rebuilds the same ModelConfig and the same logits
(f32: exact; q8_0 experts: close), with llama.cpp's keys and tensor names (gguf 0.19's constants). The
GPT-OSS gate/up expert biases travel as ffn_{gate,up}_exps.bias, the down bias as ffn_down_exps.bias.

transformers 5.24 cannot read a GPT-OSS GGUF with rope.scaling keys (its reader takes a field's first part,
the key length, as the value; numpy 2 refuses float() on it), and has no glm4moe GGUF mapping: our GGUF is
checked against our in-memory model, which tests/models/test_transformer.py checks against transformers."""

import pytest
import torch

from hotexperts.engine.gguf_export import write_gguf
from hotexperts.engine.load_gguf import load_gguf
from hotexperts.engine.presets import build_in_memory
from hotexperts.experts.reference import DenseExecutor
from hotexperts.loading.gguf_reader import GGUFFile

TOKS = torch.tensor([5, 17, 300, 2, 77, 900, 41, 8, 123, 64, 3, 1000, 9, 9, 31])
KEYS = {"tiny-gpt-oss": ("gpt-oss", ["attention.sliding_window", "expert_feed_forward_length",
                                     "rope.scaling.type", "rope.scaling.factor",
                                     "rope.scaling.original_context_length"],
                         ["blk.0.attn_sinks.weight", "blk.0.ffn_gate_exps.bias", "blk.0.ffn_up_exps.bias",
                          "blk.0.ffn_down_exps.bias", "blk.0.ffn_gate_inp.bias", "blk.0.attn_output.bias",
                          "blk.0.post_attention_norm.weight"]),
        "tiny-glm4-moe": ("glm4moe", ["leading_dense_block_count", "expert_weights_scale",
                                      "expert_weights_norm", "expert_group_count",
                                      "expert_group_used_count", "expert_shared_count",
                                      "rope.dimension_count"],
                          ["blk.1.exp_probs_b.bias", "blk.1.ffn_gate_shexp.weight", "blk.0.ffn_gate.weight",
                           "blk.1.attn_q_norm.weight", "blk.1.post_attention_norm.weight"])}


def _logits(lm):
    ex = DenseExecutor({l: lm.store.layer(l) for l in lm.store.layers})
    with torch.inference_mode():
        return lm.model(TOKS, torch.arange(len(TOKS)), lm.model.new_kv_cache(32), ex)


@pytest.fixture(scope="module", params=sorted(KEYS))
def lm(request):
    return request.param, build_in_memory(request.param, dtype="float32", device="cpu")


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_gguf_round_trip(lm, quant, tmp_path):
    preset, ours = lm
    path = write_gguf(ours, tmp_path / "m.gguf", quant=quant, dense="f32")[0]
    back = load_gguf(path, dtype="float32", device="cpu")
    assert back.cfg == ours.cfg
    tol = 0.0 if quant == "f32" else 5e-2
    torch.testing.assert_close(_logits(back), _logits(ours), atol=tol, rtol=tol)
    if quant == "q8_0":
        assert (_logits(back).argmax(-1) == _logits(ours).argmax(-1)).float().mean() > 0.9
    arch, keys, tensors = KEYS[preset]
    f = GGUFFile(path)
    assert f.get("general.architecture") == arch
    assert all(f.get(f"{arch}.{k}") is not None for k in keys)
    assert all(t in f for t in tensors)
