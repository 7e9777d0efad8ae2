"""CUDA graphs of the T=1 decode step: the pure model's forward is capturable (no host syncs, static
shapes), and runner/cuda_graph.GraphDecodeStep captures the compiled stages too.

The captures use a sync-free gather executor (every expert resident, indexed by id); on CPU we only check
that this helper agrees with DenseExecutor, so the GPU tests compare like with like.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_tiny

from hotexperts.engine.engine import Engine
from hotexperts.engine.runner import compile_decode
from hotexperts.engine.runner.cuda_graph import EagerDecodeStep, GraphDecodeStep
from hotexperts.executor import ExpertExecutor
from hotexperts.experts.reference import DenseExecutor

pytestmark = pytest.mark.usefixtures("one_thread")          # tests/conftest.py
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral_swa", "olmoe"]
PROMPT, DECODE = 5, 6


class GatherExecutor(ExpertExecutor):
    """y = sum_k w * expert(x) via gathered expert weights: no host syncs, fixed shapes."""

    graph_safe = True

    def __init__(self, experts, device, dtype):
        self.w13 = {i: le.w13.to(device, dtype) for i, le in experts.items()}   # [E, 2I, D]
        self.w2 = {i: le.w2.to(device, dtype) for i, le in experts.items()}     # [E, D, I]

    def __call__(self, layer, x, ids, weights):
        h = torch.einsum("tkod,td->tko", self.w13[layer][ids], x)              # [T, K, 2I]
        gate, up = h.chunk(2, dim=-1)
        out = torch.einsum("tkdi,tki->tkd", self.w2[layer][ids], F.silu(gate) * up)   # [T, K, D]
        return (out * weights[..., None]).sum(1)


@torch.no_grad()
def test_gather_executor_matches_dense():
    model, experts = build_tiny("qwen3_moe")
    seq = torch.arange(2, 12)
    a = model(seq, torch.arange(10), model.new_kv_cache(16), DenseExecutor(experts))
    b = model(seq, torch.arange(10), model.new_kv_cache(16), GatherExecutor(experts, "cpu", torch.float32))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ARCHS)
@torch.no_grad()
def test_decode_step_cuda_graph(name):
    dev = torch.device("cuda")
    model, experts = build_tiny(name)
    model = model.to(dev)
    ex = GatherExecutor(experts, dev, torch.float32)
    prompt, steps, max_seq = 10, 12, 32
    kv_eager, kv_graph = model.new_kv_cache(max_seq), model.new_kv_cache(max_seq)
    seq = torch.arange(1, prompt + 1, device=dev)
    first = model(seq, torch.arange(prompt, device=dev), kv_eager, ex)
    model(seq, torch.arange(prompt, device=dev), kv_graph, ex)
    tok, pos = torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                                           # warm up at a scratch position
        tok.fill_(0), pos.fill_(max_seq - 1)
        model(tok, pos, kv_graph, ex)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(tok, pos, kv_graph, ex)
    nxt = first[-1].argmax()
    for p in range(prompt, prompt + steps):
        tok.copy_(nxt.view(1)), pos.fill_(p)
        graph.replay()
        ref = model(nxt.view(1), torch.tensor([p], device=dev), kv_eager, ex)
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
        nxt = ref[-1].argmax()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ARCHS)
@torch.no_grad()
def test_compiled_step_in_one_cuda_graph(name):
    """GraphDecodeStep over the compiled stages: compiles before the warm-up, captures, replays; logits as
    the eager (ungraphed, uncompiled) step's, fed the same tokens."""
    torch._dynamo.reset()
    dev = torch.device("cuda")
    model, experts = build_tiny(name)
    model = model.to(dev)
    ex = GatherExecutor(experts, dev, torch.float32)
    prompt = torch.arange(1, PROMPT + 1, device=dev)
    kv_ref, kv = model.new_kv_cache(32), model.new_kv_cache(32)
    for cache in (kv_ref, kv):
        model(prompt, torch.arange(PROMPT, device=dev), cache, ex, kv_len=PROMPT)
    eager = EagerDecodeStep(model, kv_ref, ex, dev)
    toks, ref = [7], []
    for p in range(PROMPT, PROMPT + DECODE):
        ref.append(eager(toks[-1], p).clone())
        toks.append(int(ref[-1].argmax()))
    stages = compile_decode(model)
    step = GraphDecodeStep(model, kv, ex, dev)
    for i, p in enumerate(range(PROMPT, PROMPT + DECODE)):
        torch.testing.assert_close(step(toks[i], p), ref[i], atol=1e-4, rtol=1e-4)
    assert step.graphed and not step.failed and stages.ready
    kinds = len({layer.is_moe for layer in model.model.layers})
    assert dict(stages.graphs) == {"prepare": 1, "layer": kinds, "head": 1}
    compile_decode(model, False)
    torch._dynamo.reset()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-qwen3.5-moe", "tiny-qwen3-next"])
def test_graphed_decode_steps_equal_eager_ones_from_the_first_step(preset):
    """The engine's graphed T=1 step from its very first call (the capture) on: its warm-up forwards put a
    linear layer's conv and recurrent state back, so the first replay starts from the prompt's state (they
    advanced it twice before, and every token after the capture came out of a wrong state)."""
    prompt, tokens, logits = [5, 17, 300, 2, 77, 900, 41, 8], [11, 400, 23, 9, 70, 5], {}
    for graph in (False, True):
        eng = Engine.load(f"preset:{preset}", dtype="float32", device="cuda", max_context=64,
                          use_cuda_graph=graph)
        try:
            rounds = []
            for _ in range(2):
                eng.prefill(prompt)
                rounds.append(torch.stack([eng.decode_one(t, len(prompt) + i).float().clone()
                                           for i, t in enumerate(tokens)]))
            assert eng.generator.decode_step.graphed == graph
            logits[graph] = rounds
        finally:
            eng.close()
    for eager, graphed in zip(logits[False], logits[True], strict=True):
        torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
