"""Layer-level checks: KV-cache mask, tied embeddings, bf16 forward, rope table vs transformers."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import COMMON, TINY, _spread_init, ours_from_hf

from hotexperts.experts.reference import DenseExecutor
from hotexperts.models.layers import HostEmbedding, KVCache, RotaryEmbedding, apply_rope, rotate_half
from hotexperts.models.transformer import MoETransformer


def test_mask_causal_and_sliding():
    kv = KVCache(1, 8, 1, 2, torch.float32)
    m = kv.mask(torch.tensor([2, 3]))
    assert m.tolist() == [[True] * 3 + [False] * 5, [True] * 4 + [False] * 4]
    m = kv.mask(torch.tensor([6]), sliding_window=3)
    assert m.tolist() == [[False] * 4 + [True] * 3 + [False]]


def test_kv_update_writes_positions():
    kv = KVCache(2, 6, 2, 4, torch.float32)
    k = torch.ones(2, 2, 4)
    kc, _ = kv.update(1, torch.tensor([3, 4]), k, 2 * k)
    assert kc[:, 3:5].eq(1).all() and kc[:, :3].eq(0).all() and kv.v[1, :, 3:5].eq(2).all()
    assert kv.k[0].eq(0).all()


@torch.no_grad()
def test_tied_embeddings():
    cfg_cls, model_cls, kw = TINY["qwen3_moe"]
    hf = model_cls(cfg_cls(**{**COMMON, "tie_word_embeddings": True}, **kw)).eval()
    _spread_init(hf, 3)
    model, experts = ours_from_hf(hf)
    assert model.cfg.tie_word_embeddings and not hasattr(model, "lm_head")
    seq = torch.arange(1, 11)
    got = model(seq, torch.arange(10), model.new_kv_cache(16), DenseExecutor(experts))
    torch.testing.assert_close(got, hf(seq[None]).logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe"])
@torch.no_grad()
def test_bf16_close_to_fp32(hf_models, name):
    model, experts = ours_from_hf(hf_models(name))
    seq = torch.arange(3, 13)
    ref = model(seq, torch.arange(10), model.new_kv_cache(16), DenseExecutor(experts))
    model = model.to(torch.bfloat16)
    got = model(seq, torch.arange(10), model.new_kv_cache(16), DenseExecutor(experts, "cpu", torch.bfloat16))
    assert got.dtype == torch.float32
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.98


def test_rope_frequencies_match_transformers():
    rope = {"rope_type": "default", "rope_theta": 5e5}
    cfg = tf.Qwen3MoeConfig(**COMMON, head_dim=16, rope_parameters=rope)
    hf_rope = tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeRotaryEmbedding(cfg)
    ours = RotaryEmbedding(16, 5e5)
    pos = torch.arange(0, 200, 7)
    cos, sin = hf_rope(torch.zeros(1, dtype=torch.float32), pos[None])
    got = ours(pos, torch.float32)
    signed = torch.cat((-sin[0][:, :8], sin[0][:, 8:]), dim=-1)            # (-sin, +sin) over the halves
    assert torch.equal(got[0], cos[0]) and torch.equal(got[1], signed)
    x = torch.randn(len(pos), 3, 16)
    hf = x * cos[0][:, None] + rotate_half(x) * sin[0][:, None]             # HF's apply_rotary_pos_emb
    torch.testing.assert_close(apply_rope(x, *got), hf, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_meta_construction_and_last_only(hf_models):
    model, experts = ours_from_hf(hf_models("olmoe"))
    with torch.device("meta"):
        lazy = MoETransformer(model.cfg)                                    # the loader's path: no allocation
    lazy.load_state_dict(model.state_dict(), assign=True, strict=True)
    assert lazy.rotary.inv_freq.device.type == "cpu"
    seq = torch.arange(1, 9)
    full = model(seq, torch.arange(8), model.new_kv_cache(16), DenseExecutor(experts))
    last = lazy(seq, torch.arange(8), lazy.new_kv_cache(16), DenseExecutor(experts), last_only=True)
    assert last.shape == (1, model.cfg.vocab_size)
    torch.testing.assert_close(last, full[-1:], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_embedding_stage_waits_for_the_previous_copy():
    """Back-to-back stage() calls with a busy stream (no host read between them) keep each token's row: the
    async copy of the previous row has run before host_row is overwritten (H100 run 22: without the wait,
    decode steps fed known tokens embedded a later token; the verify test's reference was wrong)."""
    emb = HostEmbedding(torch.randn(16, 64), "cuda")
    rows = []
    for t in range(16):
        torch.cuda._sleep(2_000_000)                     # keep the stream busy so the copy is queued
        emb.stage(t)
        rows.append(emb.dev_row.clone())
    assert all(torch.equal(r.cpu(), emb.weight[t:t + 1]) for t, r in enumerate(rows))
