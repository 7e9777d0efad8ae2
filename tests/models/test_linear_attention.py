"""Hybrid models (Qwen3.5-MoE, Qwen3-Next): the Gated DeltaNet kernels, prompt lengths around the chunk size,
state carried across prompt chunks and reset by a new sequence, the per-layer-kind cache, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import ours_from_hf
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf_q35

from hotexperts.errors import ModelLoadError
from hotexperts.experts.reference import DenseExecutor
from hotexperts.kernels import deltanet as dn
from hotexperts.models import get_arch, split_state_dict
from hotexperts.models.cache import LayerKindCache, cache_bytes

HYBRID = ("qwen3_5_moe", "qwen3_next")
# logits are ~8 in magnitude; the chunked and recurrent forms sum in different orders in fp32 (the kernels
# alone agree with transformers' to ~1e-6, test_chunked_equals_recurrent_and_transformers in this file)
ATOL, RTOL = 2e-3, 1e-3


def _inputs(T, Hk=2, Hv=4, dk=16, dv=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return (r(T, Hk, dk), r(T, Hk, dk), r(T, Hv, dv), -torch.rand(T, Hv, generator=g, dtype=dtype) * 2,
            torch.rand(T, Hv, generator=g, dtype=dtype), r(Hv, dk, dv))


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 130])
def test_chunked_equals_recurrent_and_transformers(T):
    q, k, v, g, beta, s0 = _inputs(T)
    prepped = dn._heads_first(q, k, v, g, beta)
    rec_state, chunk_state = s0.clone(), s0.clone()
    rec = dn.recurrent(*[t.double() for t in prepped], rec_state)
    chunk = dn.chunked(*[t.double() for t in prepped], chunk_state)
    torch.testing.assert_close(chunk, rec, atol=1e-10, rtol=1e-10)            # exact math, float64
    torch.testing.assert_close(chunk_state, rec_state, atol=1e-10, rtol=1e-10)
    f = [t.float() for t in (q, k, v, g, beta)]
    state = s0.float().clone()
    ours = dn.gated_delta(*f, state, backend="torch")
    ref, ref_state = hf_q35.torch_chunk_gated_delta_rule.__wrapped__(      # the torch code, no hub lookup
        *[t[None] for t in f], initial_state=s0.float()[None], output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(ours, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, ref_state[0], atol=1e-5, rtol=1e-5)


def test_causal_conv_matches_transformers_and_keeps_the_last_inputs():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 6, generator=g), torch.randn(6, 4, generator=g)
    state = torch.zeros(6, 3)
    ours = torch.cat([dn.causal_conv(x[:5], w, state), dn.causal_conv(x[5:], w, state)])
    ref = hf_q35.causal_conv1d_fn.__wrapped__(x.t()[None], w, None, activation="silu")[0].t()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(state, x[-3:].t())


def _ours(hf):
    model, experts = ours_from_hf(hf)
    return model, DenseExecutor(experts, "cpu", torch.float32)


def _run(model, ex, seq, pieces, kv=None):
    """Prompt seq in prompt chunks of `pieces` tokens (the last ones one by one): logits [T, V]."""
    kv = kv or model.new_kv_cache(256)
    out, start = [], 0
    for n in pieces:
        out.append(model(seq[start:start + n], torch.arange(start, start + n), kv, ex))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("name", HYBRID)
@pytest.mark.parametrize("T", [63, 64, 65, 129])
@torch.no_grad()
def test_prompt_lengths_around_the_chunk_size_match_hf(hf_models, name, T):
    hf = hf_models(name)
    model, ex = _ours(hf)
    seq = torch.randint(1, hf.config.vocab_size, (T + 2,), generator=torch.Generator().manual_seed(T))
    ref = hf(seq[None]).logits[0]
    torch.testing.assert_close(_run(model, ex, seq, [T, 1, 1]), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", HYBRID)
@torch.no_grad()
def test_state_carries_across_prompt_chunks_and_resets_for_a_new_sequence(hf_models, name):
    hf = hf_models(name)
    model, ex = _ours(hf)
    seq = torch.randint(1, hf.config.vocab_size, (100,), generator=torch.Generator().manual_seed(7))
    whole = _run(model, ex, seq, [100])
    kv = model.new_kv_cache(256)
    _run(model, ex, seq.flip(0), [100], kv)                                   # leaves states behind
    pieces = _run(model, ex, seq, [37, 1, 26, 36], kv)                       # position 0: a new sequence
    torch.testing.assert_close(pieces, whole, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pieces, hf(seq[None]).logits[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", HYBRID)
def test_cache_holds_kv_for_attention_and_states_for_deltanet_layers(hf_models, name):
    model, _ = _ours(hf_models(name))
    cfg = model.cfg
    kv = model.new_kv_cache(50)
    assert isinstance(kv, LayerKindCache) and kv.k.shape[0] == len(cfg.attention_layers) == 1
    s = cfg.linear
    conv, state = kv.layer(0)
    assert conv.shape == (s.conv_dim, s.conv_kernel - 1) and state.dtype == torch.float32
    assert state.shape == (s.num_value_heads, s.key_head_dim, s.value_head_dim)
    assert kv.layer(3)[0].shape == (cfg.num_kv_heads, 50, cfg.head_dim)
    held = sum(b.numel() * b.element_size() for n, b in kv.named_buffers() if n != "positions")
    assert cache_bytes(cfg, 50, torch.float32) == held


def _vlm_checkpoint(hf):
    """The text model's weights and config as the Qwen3.5 VLM checkpoint spells them, plus vision/MTP."""
    sd = {k.replace("model.", "model.language_model.", 1): v for k, v in hf.state_dict().items()}
    sd |= {"model.visual.blocks.0.attn.qkv.weight": torch.zeros(3, 3), "mtp.fc.weight": torch.zeros(3, 3)}
    text = hf.config.to_dict()
    return sd, {"model_type": "qwen3_5_moe", "text_config": text, "vision_config": {"depth": 1},
                "tie_word_embeddings": False}


def test_vlm_config_and_prefixed_weights_load_the_text_model(hf_models):
    hf = hf_models("qwen3_5_moe")
    sd, d = _vlm_checkpoint(hf)
    arch = get_arch(d["model_type"])
    cfg = arch.config_from_hf(d)
    assert cfg == get_arch("qwen3_5_moe_text").config_from_hf(hf.config.to_dict())
    assert arch.rename("model.visual.blocks.0.attn.qkv.weight") is None
    assert arch.rename("mtp.fc.weight") is None
    dense, experts = split_state_dict(arch, cfg, sd)
    ours, _ = _ours(hf)
    assert dense.keys() == ours.state_dict().keys() and sorted(experts) == list(cfg.moe_layers)


@pytest.mark.parametrize("name", HYBRID)
def test_unknown_layer_type_is_one_clear_error(hf_models, name):
    d = hf_models(name).config.to_dict()
    d["layer_types"] = [*d["layer_types"][:-1], "sliding_attention"]
    with pytest.raises(ModelLoadError, match=r"layer_types\[3\] = 'sliding_attention' is not supported"):
        get_arch(d["model_type"]).config_from_hf(d)


@torch.no_grad()
def test_qwen3_next_qkv_z_ba_layout_of_current_llama_cpp_files_is_the_same_model(hf_models):
    """llama.cpp's current converter splits in_proj_qkvz (per key head: q | k | v group | z group) into
    attn_qkv (all q, all k, all v) and attn_gate (all z): that layout gives the same logits."""
    from dataclasses import replace

    from hotexperts.models.transformer import MoETransformer

    hf = hf_models("qwen3_next")
    fused, ex = _ours(hf)
    cfg = replace(fused.cfg, extra={**fused.cfg.extra, "linear_proj": "qkv_z_ba"})
    s = cfg.linear
    Hk, dk, rdv = s.num_key_heads, s.key_head_dim, s.num_value_heads // s.num_key_heads * s.value_head_dim
    sd = {}
    for name, t in fused.state_dict().items():
        if name.endswith("in_proj_qkvz.weight"):
            q, k, v, z = t.view(Hk, 2 * dk + 2 * rdv, -1).split([dk, dk, rdv, rdv], dim=1)
            base = name.removesuffix("in_proj_qkvz.weight")
            sd[base + "in_proj_qkv.weight"] = torch.cat([p.reshape(-1, t.shape[1]) for p in (q, k, v)])
            sd[base + "in_proj_z.weight"] = z.reshape(-1, t.shape[1])
        else:
            sd[name] = t
    split = MoETransformer(cfg).eval()
    split.load_state_dict(sd, strict=True)
    seq = torch.randint(1, 96, (20,), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_run(split, ex, seq, [19, 1]), _run(fused, ex, seq, [19, 1]))
