"""Model transformations applied from outside (models/transforms.py): fuse_qkv keeps the logits of
transformers, the parameter names and state_dict, follows later loads, and survives moving the model."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, ours_from_hf

from hotexperts.experts.reference import DenseExecutor
from hotexperts.models.transforms import fuse_qkv

PROMPT = 5


@pytest.mark.parametrize("name", sorted(TINY))
@torch.no_grad()
def test_fused_qkv_matches_hf_and_keeps_the_weights(hf_models, name):
    hf = hf_models(name)
    model, experts = ours_from_hf(hf)
    ex = DenseExecutor(experts, "cpu", torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_qkv(model) is model
    first = model.cfg.attention_layers[0]                           # hybrid models: layer 3 is attention
    attn = model.model.layers[first].self_attn
    q_rows = attn.q_proj.out_features                               # H hd, or 2 H hd with an output gate
    assert attn.qkv_weight is not None
    assert attn.k_proj.weight.data_ptr() == attn.qkv_weight[q_rows:].data_ptr()
    sd = model.state_dict()
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], v) for k, v in before.items())
    seq = torch.randint(1, hf.config.vocab_size, (PROMPT + 3,), generator=torch.Generator().manual_seed(5))
    ref = hf(seq[None]).logits[0].float()
    kv = model.new_kv_cache(32)
    got = [model(seq[:PROMPT], torch.arange(PROMPT), kv, ex)]                 # prefill uses it too
    got += [model(seq[p:p + 1], torch.tensor([p]), kv, ex) for p in range(PROMPT, PROMPT + 3)]
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-4, rtol=1e-4)
    scaled = {k: 2 * v if "k_proj.weight" in k else v for k, v in before.items()}
    model.load_state_dict(scaled)                                             # a later load lands in it
    assert torch.equal(attn.qkv_weight[q_rows:][:attn.k_proj.out_features],
                       2 * before[f"model.layers.{first}.self_attn.k_proj.weight"])
    fuse_qkv(model, False)
    assert attn.qkv_weight is None


def _views_current(attn) -> bool:
    views = attn.qkv_weight.split([attn.q_proj.out_features, attn.k_proj.out_features,
                                   attn.v_proj.out_features])
    return all(p.weight.data_ptr() == v.data_ptr() and p.weight.dtype == v.dtype
               for p, v in zip((attn.q_proj, attn.k_proj, attn.v_proj), views, strict=True))


@torch.no_grad()
def test_fused_qkv_follows_the_model_when_it_moves(hf_models):
    """.to() converts q/k/v one by one: the fused weight is rebuilt on the new dtype / device instead of
    staying behind (it used to go stale after .cuda() / .half())."""
    model, experts = ours_from_hf(hf_models("qwen2_moe"))                   # q/k/v with biases
    fuse_qkv(model)
    attn = model.model.layers[0].self_attn
    fused = attn.qkv_weight
    model.to(torch.float32)                                                 # nothing to convert: kept
    assert attn.qkv_weight is fused and _views_current(attn)
    model.to(torch.float64)
    assert attn.qkv_weight.dtype == torch.float64 and attn.qkv_bias.dtype == torch.float64
    assert _views_current(attn)
    seq = torch.arange(1, 9)
    ex = DenseExecutor(experts, "cpu", torch.float64)
    fused_logits = model(seq, torch.arange(8), model.new_kv_cache(16), ex)
    fuse_qkv(model, False)
    torch.testing.assert_close(fused_logits, model(seq, torch.arange(8), model.new_kv_cache(16), ex),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_fused_qkv_after_cuda(hf_models):
    model, experts = ours_from_hf(hf_models("olmoe"))
    seq = torch.arange(1, 9)
    ref = model(seq, torch.arange(8), model.new_kv_cache(16), DenseExecutor(experts))
    fuse_qkv(model)                                                         # on the CPU, then moved
    model.cuda()
    attn = model.model.layers[0].self_attn
    assert attn.qkv_weight.is_cuda and _views_current(attn)
    dev = torch.device("cuda")
    got = model(seq.to(dev), torch.arange(8, device=dev), model.new_kv_cache(16),
                DenseExecutor(experts, dev, torch.float32))
    torch.testing.assert_close(got.cpu(), ref, atol=1e-4, rtol=1e-4)
