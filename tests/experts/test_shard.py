"""ShardExecutor and slice_experts (experts/shard.py): every format cut exactly along the intermediate dim,
and the cards' partial outputs (summed, as the all-reduce does) equal the reference for both layouts."""

import pytest
import torch

from hotexperts.config import KernelOptions
from hotexperts.engine.presets import build_in_memory
from hotexperts.errors import PlacementError
from hotexperts.experts.multi_placement import ShardSizes, plan_cards
from hotexperts.experts.reference import DenseExecutor
from hotexperts.experts.shard import ShardExecutor, column_granularity, slice_experts
from hotexperts.quant import dequantize, quantize_layer
from hotexperts.weights import LayerExperts


def dense(w):
    return w if isinstance(w, torch.Tensor) else dequantize(w, torch.float32)


@pytest.mark.parametrize("fmt,D,I,lo,hi", [("none", 64, 96, 16, 75), ("int8", 64, 96, 3, 50),
                                           ("int8g32", 64, 96, 32, 96), ("int4", 64, 96, 0, 64),
                                           ("q4_k", 256, 512, 256, 512)])
def test_slice_experts_is_exact(fmt, D, I, lo, hi):
    gen = torch.Generator().manual_seed(0)
    le = quantize_layer(LayerExperts(torch.randn(5, 2 * I, D, generator=gen),
                                     torch.randn(5, D, I, generator=gen)), fmt)
    experts = [4, 1, 2]
    part = slice_experts(le, experts, lo, hi)
    w13, w2 = dense(le.w13)[experts], dense(le.w2)[experts]
    rows = list(range(lo, hi)) + list(range(I + lo, I + hi))
    assert torch.equal(dense(part.w13), w13[:, rows])
    assert torch.equal(dense(part.w2), w2[..., lo:hi])
    assert column_granularity(le.w2) in {"none": (1,), "int8": (1,), "int8g32": (32,), "int4": (32,),
                                         "q4_k": (256,)}[fmt]


def test_slice_experts_refuses_a_cut_inside_a_group():
    le = quantize_layer(LayerExperts(torch.randn(2, 128, 64), torch.randn(2, 64, 64)), "int4")
    with pytest.raises(PlacementError, match="groups 32 columns"):
        slice_experts(le, [0], 0, 40)
    with pytest.raises(PlacementError, match="outside"):
        slice_experts(le, [0], 0, 96)


@pytest.fixture(scope="module", params=["tiny-qwen3-moe", "tiny-gpt-oss", "tiny-qwen3-moe:int4g32"])
def store_cfg(request):
    preset, _, quant = request.param.partition(":")
    lm = build_in_memory(preset, dtype="float32", device="cpu")
    return (lm.store.quantize(quant) if quant else lm.store), lm.cfg


EXACT = KernelOptions(act_quant=False)          # the CPU kernel's fp32 path (its int8 activations round)


def plan_for(store, cfg, mode, per_card=(24, 12)):
    eb, group = store.expert_nbytes, column_granularity(store.layer(store.layers[0]).w2)
    sizes = ShardSizes(tuple(store.layers), store.num_experts, cfg.moe_intermediate_size, eb, cfg.top_k,
                       group)
    return plan_cards(sizes, tuple(n * eb + 10 for n in per_card), (10, 10), mode=mode)


@pytest.mark.parametrize("mode", ["sharded", "pools"])
def test_partials_sum_to_the_reference(store_cfg, mode):
    store, cfg = store_cfg
    plan = plan_for(store, cfg, mode)
    assert any(plan.cpu_experts(l) for l in store.layers) and any(plan.resident(l) for l in store.layers)
    if mode == "sharded":
        assert all(0 < c.rows[1] - c.rows[0] < cfg.moe_intermediate_size for c in plan.cards)
    reduced = []
    cards = [ShardExecutor(plan, c, store, "cpu", all_reduce=reduced.append, options=EXACT) for c in range(2)]
    ref = DenseExecutor({l: store.layer(l) for l in store.layers})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, cfg.hidden_size, generator=gen)
    ids = torch.randint(0, store.num_experts, (6, cfg.top_k), generator=gen)
    ids[0, 0], ids[3, 1] = -1, -1
    w = torch.rand(6, cfg.top_k, generator=gen)
    for l in store.layers:
        got = sum(card(l, x, ids, w) for card in cards)
        torch.testing.assert_close(got, ref(l, x, ids, w), atol=1e-5, rtol=1e-5)
    assert len(reduced) == 2 * len(store.layers)                     # one all-reduce per card and layer


def test_only_the_cpu_card_computes_the_cpu_experts(store_cfg):
    store, cfg = store_cfg
    plan = plan_for(store, cfg, "sharded", per_card=(0, 0))            # nothing fits: all on the CPU
    ids = torch.randint(0, store.num_experts, (3, cfg.top_k))
    x, w = torch.randn(3, cfg.hidden_size), torch.rand(3, cfg.top_k)
    l = store.layers[0]
    other = ShardExecutor(plan, 1, store, "cpu", all_reduce=lambda t: None)
    assert torch.count_nonzero(other(l, x, ids, w)) == 0
    cpu = ShardExecutor(plan, 0, store, "cpu", all_reduce=lambda t: None, options=EXACT)
    ref = DenseExecutor({l: store.layer(l)})
    torch.testing.assert_close(cpu(l, x, ids, w), ref(l, x, ids, w), atol=1e-5, rtol=1e-5)
    with pytest.raises(PlacementError, match="card 2"):
        ShardExecutor(plan, 2, store, "cpu", all_reduce=lambda t: None)
