"""Dense weights and the token embedding out of the way of experts (issue 16): a GGUF's Q8_0 projections stay
int8g32 (QuantLinear) with the logits of their dequantization, routers stay exact, and the token embedding in
host memory (HostEmbedding, staged per decode step) gives the same tokens."""

from __future__ import annotations

import pytest
import torch

from hotexperts.engine import presets
from hotexperts.engine.generate import Generator
from hotexperts.engine.gguf_export import write_gguf
from hotexperts.engine.load_gguf import load_gguf
from hotexperts.engine.sampling import SamplingParams
from hotexperts.experts.reference import DenseExecutor
from hotexperts.models.layers import HostEmbedding
from hotexperts.models.qlinear import QuantLinear
from hotexperts.models.transforms import fuse_qkv


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    lm = presets.build_in_memory("tiny-qwen3-moe", dtype="float32", device="cpu")
    return write_gguf(lm, tmp_path_factory.mktemp("dq") / "m.gguf", "q8_0", dense="q8_0")[0]


def _logits(lm, tokens):
    ex = DenseExecutor({l: lm.store.layer(l) for l in lm.store.layers}, "cpu", torch.float32)
    kv = lm.model.new_kv_cache(len(tokens))
    return lm.model(torch.tensor(tokens), torch.arange(len(tokens)), kv, ex)


def _tokens(lm, prompt, n=8):
    ex = DenseExecutor({l: lm.store.layer(l) for l in lm.store.layers}, "cpu", torch.float32)
    gen = Generator(lm.model, ex, lm.cfg, "cpu", 64)
    return list(gen.generate(prompt, SamplingParams(max_tokens=n)))


def test_q8_0_projections_stay_quantized_with_the_same_logits(gguf):
    kept = load_gguf(gguf, dtype="float32", device="cpu")
    flat = load_gguf(gguf, dtype="float32", device="cpu", dense_quant="dequantize")
    layer = kept.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantLinear) and isinstance(kept.model.lm_head, QuantLinear)
    assert isinstance(layer.mlp.gate, torch.nn.Linear)                          # the router stays exact
    def size(m):                                                                # bytes but the embedding's
        emb = m.model.embed_tokens.weight
        return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers())) - emb.nbytes

    assert size(kept.model) < 0.4 * size(flat.model)                            # int8 + scales vs fp32
    tokens = [5, 17, 300, 2, 77]
    torch.testing.assert_close(_logits(kept, tokens), _logits(flat, tokens), rtol=1e-5, atol=1e-5)
    fuse_qkv(kept.model)
    assert layer.self_attn.qkv_quant is not None
    torch.testing.assert_close(_logits(kept, tokens), _logits(flat, tokens), rtol=1e-5, atol=1e-5)
    assert _tokens(kept, tokens) == _tokens(flat, tokens)


def test_host_embedding_gives_the_same_tokens(gguf):
    plain = load_gguf(gguf, dtype="float32", device="cpu")
    host = load_gguf(gguf, dtype="float32", device="cpu", host_embedding=True)
    emb = host.model.model.embed_tokens
    assert isinstance(emb, HostEmbedding) and emb.weight.device.type == "cpu"
    host.model.to("cpu")                                                        # stays where it is
    assert host.model.model.embed_tokens.weight.device.type == "cpu"
    prompt = [9, 4, 250, 31]
    torch.testing.assert_close(_logits(host, prompt), _logits(plain, prompt))
    assert _tokens(host, prompt) == _tokens(plain, prompt)                      # decode: staged rows


def test_a_staged_row_is_read_only_inside_the_staged_context(gguf):
    emb = load_gguf(gguf, dtype="float32", device="cpu", host_embedding=True).model.model.embed_tokens
    emb.stage(3)
    with emb.staged():
        assert torch.equal(emb(torch.tensor([0])), emb.weight[3:4])            # the staged row
    assert torch.equal(emb(torch.tensor([0])), emb.weight[0:1])                # a 1-token prompt: gathered


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_with_quantized_projections_and_a_host_embedding(gguf):
    """On CUDA: the Q8_0 GEMV and the staged host-embedding row inside one captured decode graph give the
    tokens of the same model decoding eagerly with dequantized projections on the device."""
    from hotexperts.experts.gpu_executor import GpuExecutor

    fast = load_gguf(gguf, dtype="float32", device="cuda", host_embedding=True)
    plain = load_gguf(gguf, dtype="float32", device="cuda", dense_quant="dequantize")
    fuse_qkv(fast.model)
    prompt, params = [9, 4, 250, 31], SamplingParams(max_tokens=8)
    ref = DenseExecutor({l: plain.store.layer(l) for l in plain.store.layers}, "cuda", torch.float32)
    want = list(Generator(plain.model, ref, plain.cfg, "cuda", 64).generate(prompt, params))
    ex = GpuExecutor(fast.store, "cuda")
    assert ex.graph_safe
    gen = Generator(fast.model, ex, fast.cfg, "cuda", 64)
    assert list(gen.generate(prompt, params)) == want
    assert gen.decode_step.graphed                                    # the whole step was one graph
