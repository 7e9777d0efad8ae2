"""Our MoETransformer + DenseExecutor vs transformers: prefill, KV-cache decode and greedy generation."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, ours_from_hf

from hotexperts.experts.reference import DenseExecutor

PROMPT = 12
DECODE = 6
GEN = 32


def ours(hf: torch.nn.Module):
    model, experts = ours_from_hf(hf)
    return model, DenseExecutor(experts, "cpu", torch.float32)


def greedy(model, ex, prompt: torch.Tensor, n: int) -> list[int]:
    kv = model.new_kv_cache(prompt.numel() + n)
    logits = model(prompt, torch.arange(prompt.numel()), kv, ex)
    out, pos = [], prompt.numel()
    for _ in range(n):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = model(torch.tensor([tok]), torch.tensor([pos]), kv, ex)
        pos += 1
    return out


@pytest.mark.parametrize("name", sorted(TINY))
@torch.no_grad()
def test_prefill_and_decode_logits_match(hf_models, name):
    hf = hf_models(name)
    model, ex = ours(hf)
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(1, hf.config.vocab_size, (PROMPT + DECODE,), generator=gen)
    ref = hf(seq[None]).logits[0].float()                                   # [T, V]
    kv = model.new_kv_cache(32)
    got = [model(seq[:PROMPT], torch.arange(PROMPT), kv, ex)]
    for p in range(PROMPT, PROMPT + DECODE):
        got.append(model(seq[p:p + 1], torch.tensor([p]), kv, ex))
    got = torch.cat(got)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY))
@torch.no_grad()
def test_greedy_generation_matches_hf_generate(hf_models, name):
    hf = hf_models(name)
    model, ex = ours(hf)
    prompt = torch.randint(1, hf.config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(prompt[None], max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False, pad_token_id=0)
    ref = ref[0, PROMPT:].tolist()
    assert greedy(model, ex, prompt, GEN) == ref
    assert len(set(ref)) >= 3, "degenerate generation: the test would not discriminate"


def test_dense_layers_follow_hf_layout(hf_models):
    m3 = ours(hf_models("qwen3_moe"))[0]
    assert m3.cfg.moe_layers == (0, 2)
    step = ours(hf_models("qwen2_moe_sparse_step"))[0]
    assert step.cfg.moe_layers == (1, 3)
    assert not step.model.layers[0].is_moe and step.model.layers[1].is_moe


def test_sliding_window_mask_is_used(hf_models):
    cfg = ours(hf_models("mixtral_swa"))[0].cfg
    assert cfg.sliding_window == 5 and PROMPT + DECODE > 2 * cfg.sliding_window
