"""Generator: stop ids, max_tokens, context errors, chunked prefill, end_step calls, parity with HF."""

import pytest
import torch

from hotexperts.config import ModelConfig
from hotexperts.engine.generate import Generator
from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import ContextLengthError, HotExpertsError
from hotexperts.experts.reference import DenseExecutor
from hotexperts.weights import LayerExperts
from tests.tiny_model import random_experts, random_model

CFG = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, num_experts=4, top_k=2, moe_intermediate_size=16,
                  moe_layers=(0, 1), qk_norm="head", eos_token_ids=())


class CountingExecutor(DenseExecutor):
    steps = 0

    def end_step(self):
        self.steps += 1


def tiny(seed=0):
    return random_model(CFG, seed), CountingExecutor(random_experts(CFG, seed))


def make_gen(max_context=64, chunk=512, seed=0):
    model, ex = tiny(seed)
    gen = Generator(model, ex, CFG, "cpu", max_context)
    gen.prefill_chunk = chunk
    return gen


def reference_greedy(gen, prompt, n):
    """Greedy decode by re-running the whole sequence each step (no KV reuse)."""
    seq = list(prompt)
    for _ in range(n):
        kv = gen.model.new_kv_cache(len(seq) + 1)
        with torch.no_grad():
            logits = gen.model(torch.tensor(seq), torch.arange(len(seq)), kv, gen.executor)
        seq.append(int(logits[-1].argmax()))
    return seq[len(prompt):]


def test_greedy_matches_full_recompute_and_chunked_prefill():
    gen = make_gen(chunk=3)
    prompt = [1, 5, 9, 2, 7, 3, 11]
    out = list(gen.generate(prompt, SamplingParams(max_tokens=8)))
    assert out == reference_greedy(gen, prompt, 8)
    assert gen.finish_reason == "length"
    # the KV cache is reused: a second, shorter request gives the same answer as a fresh generator
    short = [4, 4, 8]
    assert list(gen.generate(short, SamplingParams(max_tokens=5))) == reference_greedy(gen, short, 5)


def test_end_step_after_every_forward_and_timings():
    gen = make_gen(chunk=4)
    out = list(gen.generate(list(range(10)), SamplingParams(max_tokens=6)))
    assert len(out) == 6
    assert gen.executor.steps == 3 + 5                      # ceil(10/4) prefill chunks + 5 decode steps
    last = gen.last
    assert (last.prompt_tokens, last.gen_tokens, last.decode_steps) == (10, 6, 5)
    assert last.prompt_seconds > 0 and last.decode_seconds > 0 and last.gen_tps > 0
    list(gen.generate([1, 2], SamplingParams(max_tokens=2)))
    assert gen.total.requests == 2 and gen.total.prompt_tokens == 12 and gen.total.gen_tokens == 8


def test_stops_on_eos_and_stop_ids_without_yielding_them():
    gen = make_gen()
    prompt = [3, 1, 4, 1, 5]
    full = list(gen.generate(prompt, SamplingParams(max_tokens=10)))
    stop_tok = full[3]
    first = full.index(stop_tok)
    out = list(gen.generate(prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop_tok,))))
    assert out == full[:first] and gen.finish_reason == "stop"
    gen.cfg = CFG.__class__(**{**CFG.__dict__, "eos_token_ids": (stop_tok,)})
    assert list(gen.generate(prompt, SamplingParams(max_tokens=10))) == full[:first]
    assert list(gen.generate(prompt, SamplingParams(max_tokens=10), stop_ids=[stop_tok])) == full[:first]


def test_context_length_error_is_raised_at_call_with_numbers():
    gen = make_gen(max_context=16)
    with pytest.raises(ContextLengthError, match=r"10 tokens.*max_tokens \(7\).*17.*16"):
        gen.generate(list(range(10)), SamplingParams(max_tokens=7))
    assert len(list(gen.generate(list(range(10)), SamplingParams(max_tokens=6)))) == 6
    with pytest.raises(HotExpertsError, match="empty"):
        gen.generate([], SamplingParams())


def test_seeded_sampling_reproducible():
    gen = make_gen()
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=12)
    assert list(gen.generate([1, 2, 3], p)) == list(gen.generate([1, 2, 3], p))


def test_closing_early_still_counts_timings():
    gen = make_gen()
    it = gen.generate([1, 2, 3], SamplingParams(max_tokens=10))
    next(it), next(it)
    it.close()
    assert gen.total.requests == 1 and gen.total.gen_tokens == 2


def _tiny_hf_qwen3_moe(seed=0):
    import transformers as tf

    cfg = tf.Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=32, intermediate_size=48, max_position_embeddings=128,
                            eos_token_id=None, bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = tf.Qwen3MoeForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():                                   # spread weights: routing and argmax far from ties
        for name, p in hf.named_parameters():
            std = 0.1 if p.dim() == 1 else (1.0 if "embed" in name else 1.0 / p.shape[-1] ** 0.5)
            p.copy_((1.0 if p.dim() == 1 else 0.0) + std * torch.randn(p.shape, generator=g))
    return hf


def test_engine_greedy_matches_transformers_generate(tmp_path):
    pytest.importorskip("transformers")
    from hotexperts.engine.engine import Engine

    hf = _tiny_hf_qwen3_moe()
    hf.save_pretrained(tmp_path)
    engine = Engine.load(str(tmp_path), dtype="float32", device="cpu", max_context=64)
    prompt = [5, 17, 3, 88, 42, 9, 60]
    ours = list(engine.generate(prompt, SamplingParams(max_tokens=12)))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref
    assert len(set(ref)) > 2                                # a non-degenerate continuation
    stats = engine.stats()
    assert stats["last"]["gen_tokens"] == 12 and stats["last"]["prompt_tokens"] == 7
    assert engine.finish_reason == "length"


class AllExpertsExecutor(DenseExecutor):
    """Computes every expert for every token and masks by routing: no host syncs (graph-capturable)."""

    graph_safe = True

    def __call__(self, layer, x, ids, weights):
        w13, w2 = self.w13[layer], self.w2[layer]                            # [E, 2I, D], [E, D, I]
        gate, up = torch.einsum("eid,td->tei", w13, x).chunk(2, dim=-1)     # [T, E, I] each
        out = torch.einsum("edi,tei->ted", w2, torch.nn.functional.silu(gate) * up)   # [T, E, D]
        dense_w = torch.zeros(x.shape[0], w13.shape[0], dtype=x.dtype, device=x.device)
        dense_w.scatter_add_(1, ids, weights)                                # [T, E]
        return torch.einsum("te,ted->td", dense_w, out)


def test_eager_decode_step_on_cpu():
    from hotexperts.engine.runner.cuda_graph import EagerDecodeStep

    gen = make_gen()
    assert isinstance(gen.decode_step, EagerDecodeStep) and not gen.decode_step.graphed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager_and_syncing_executor_falls_back():
    model, ex = tiny()
    model = model.cuda()
    layers = {i: LayerExperts(ex.w13[i], ex.w2[i]) for i in CFG.moe_layers}
    prompt, p = [1, 5, 9, 2, 7], SamplingParams(max_tokens=16)
    runs = {}
    for name, executor, graph in [("eager", AllExpertsExecutor(layers, "cuda"), False),
                                  ("graph", AllExpertsExecutor(layers, "cuda"), True)]:
        gen = Generator(model, executor, CFG, "cuda", 64, use_cuda_graph=graph)
        runs[name] = list(gen.generate(prompt, p))
        assert gen.decode_step.graphed == graph
        assert list(gen.generate(prompt, p)) == runs[name]               # replays across requests
    assert runs["graph"] == runs["eager"]
    syncing = DenseExecutor(layers, "cuda")
    syncing.graph_safe = True                                            # a lie: it calls .tolist()
    gen = Generator(model, syncing, CFG, "cuda", 64)
    with pytest.warns(RuntimeWarning, match="capture"):
        out = list(gen.generate(prompt, p))
    assert out == runs["eager"] and not gen.decode_step.graphed


def test_all_experts_executor_matches_dense_on_cpu():
    model, ex = tiny()
    layers = {i: LayerExperts(ex.w13[i], ex.w2[i]) for i in CFG.moe_layers}
    p = SamplingParams(max_tokens=6)
    a = list(Generator(model, AllExpertsExecutor(layers), CFG, "cpu", 32).generate([1, 5, 9], p))
    assert a == list(Generator(model, DenseExecutor(layers), CFG, "cpu", 32).generate([1, 5, 9], p))
