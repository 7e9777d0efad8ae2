"""The N-card plan (experts/multi_placement.py): per-card budgets, both expert layouts as data, the CPU's
share, the budget kept on every card, and the cost function's choice."""

import numpy as np
import pytest

from hotexperts.errors import PlacementError
from hotexperts.experts.budget import GiB, MiB
from hotexperts.experts.multi_placement import CostInputs, ShardSizes, decode_seconds, plan_cards
from hotexperts.experts.multi_placement import parse_card_budgets as parse

MB = 1 << 20                      # one expert's bytes in these plans
SIZES = ShardSizes(moe_layers=(0, 1, 2, 3), num_experts=16, intermediate=64, expert_bytes=MB, top_k=4)
RESERVED = (100 * MB, 100 * MB)


def budgets(*experts_per_card: int) -> tuple[int, ...]:
    """Budgets that leave room for that many whole experts per card beside RESERVED."""
    return tuple(RESERVED[0] + n * MB for n in experts_per_card)


def test_parse_card_budgets():
    assert parse("24,12") == (24 * GiB, 12 * GiB)
    assert parse("512MiB, 1.5", cards=2) == (512 * MiB, int(1.5 * GiB))
    assert parse("16", cards=3) == (16 * GiB,) * 3
    assert parse(None, cards=2) == (None, None)


@pytest.mark.parametrize("text,cards,match", [("24,,12", None, "per-card budgets"),
                                               ("24,12", 3, "names 2 card"), ("0,4", 2, "positive"),
                                               ("24,lots", 2, "cannot read the size"),
                                               (None, None, "one budget per card")])
def test_parse_card_budgets_refuses(text, cards, match):
    with pytest.raises(PlacementError, match=match):
        parse(text, cards)


def check_budgets_kept(plan):
    for card in plan.cards:
        assert card.reserved + card.expert_total <= card.budget


def test_sharded_splits_rows_in_proportion_and_fits_each_card():
    plan = plan_cards(SIZES, budgets(24, 12), RESERVED, mode="sharded")
    (lo0, hi0), (lo1, hi1) = (c.rows for c in plan.cards)
    assert (lo0, hi1) == (0, 64) and hi0 == lo1                       # every row on exactly one card
    assert hi0 > 2 * (hi1 - lo1) - 4                                  # about 2:1 like the free bytes
    assert plan.cards[0].experts == plan.cards[1].experts              # the same experts on every card
    for l in SIZES.moe_layers:
        assert len(plan.resident(l)) == 8                             # 36 experts' room, rounded down
        assert set(plan.resident(l)) | set(plan.cpu_experts(l)) == set(range(16))
        assert not set(plan.resident(l)) & set(plan.cpu_experts(l))
    check_budgets_kept(plan)


def test_sharded_cuts_only_at_the_format_group():
    sizes = ShardSizes((0, 1), 16, 64, MB, 4, granularity=32)
    plan = plan_cards(sizes, budgets(24, 12), RESERVED, mode="sharded")
    assert [c.rows for c in plan.cards] == [(0, 32), (32, 64)]
    check_budgets_kept(plan)
    with pytest.raises(PlacementError, match="not a multiple"):
        ShardSizes((0,), 16, 64, MB, 4, granularity=48)


def test_pools_hold_disjoint_whole_experts_within_each_budget():
    plan = plan_cards(SIZES, budgets(24, 12), RESERVED, mode="pools")
    a, b = plan.cards
    assert a.rows == b.rows == (0, 64)
    for l in SIZES.moe_layers:
        assert len(a.experts[l]) == 6 and len(b.experts[l]) == 3      # 24 / 4 layers, 12 / 4 layers
        assert not set(a.experts[l]) & set(b.experts[l])
        assert len(plan.cpu_experts(l)) == 16 - 9
    check_budgets_kept(plan)


def test_unlimited_cards_hold_everything():
    for mode in ("sharded", "pools"):
        plan = plan_cards(SIZES, (None, None), RESERVED, mode=mode)
        assert all(plan.cpu_experts(l) == () for l in SIZES.moe_layers)
        assert plan.cards[0].budget is None


def test_routing_counts_choose_the_resident_experts():
    counts = {l: [1.0] * 16 for l in SIZES.moe_layers}
    counts[2] = [0.0] * 8 + [5.0] * 8                                   # layer 2 uses experts 8..15
    plan = plan_cards(SIZES, budgets(20, 12), RESERVED, mode="sharded", routing=counts)
    assert plan.resident(2) == tuple(range(8, 16))
    assert plan.resident(0) == tuple(range(8))                         # equal counts: id order
    with pytest.raises(PlacementError, match="routing counts of layer 0"):
        plan_cards(SIZES, budgets(20, 12), RESERVED, routing={0: [1.0] * 3})


@pytest.mark.parametrize("bad,match", [((50 * MB, 200 * MB), "card 0's budget"),
                                       ((None, 200 * MB), "every card a budget")])
def test_refuses_what_cannot_fit(bad, match):
    with pytest.raises(PlacementError, match=match):
        plan_cards(SIZES, bad, RESERVED)
    with pytest.raises(PlacementError, match="mode"):
        plan_cards(SIZES, budgets(4, 4), RESERVED, mode="tensor")


def test_the_cost_function_chooses():
    equal = budgets(16, 16)
    auto = plan_cards(SIZES, equal, RESERVED)
    assert set(auto.cost) == {"sharded", "pools"} and auto.mode == min(auto.cost, key=auto.cost.get)
    assert auto.mode == "sharded"             # pools: a token's hits rarely split evenly over the cards
    slow_slices = plan_cards(SIZES, equal, RESERVED, cost=CostInputs(shard_efficiency=0.3))
    assert slow_slices.mode == "pools"


def test_decode_seconds_counts_the_cpu_and_the_cards():
    free = plan_cards(SIZES, (None, None), RESERVED, mode="sharded")
    tight = plan_cards(SIZES, budgets(0, 0), RESERVED, mode="sharded")
    freq = {l: np.full(16, 1 / 16) for l in SIZES.moe_layers}
    cost = CostInputs(launch_s=0.0, all_reduce_s=0.0)
    cpu_only = decode_seconds(tight, SIZES, freq, cost)
    assert cpu_only == pytest.approx(4 * 4 * MB / cost.cpu_bytes_per_s)          # 4 layers x top-4 on CPU
    assert decode_seconds(free, SIZES, freq, cost) == pytest.approx(4 * 4 * MB / 2 / cost.card_rate(0))


def test_describe_prints_every_card():
    text = plan_cards(SIZES, budgets(24, 12), RESERVED).describe()
    assert "card 0: budget" in text and "card 1: budget" in text and "predicted decode" in text
    assert "on the CPU" in text
    assert "rows 0-" in plan_cards(SIZES, budgets(24, 12), RESERVED, mode="sharded").describe()
    assert "whole experts" in plan_cards(SIZES, budgets(24, 12), RESERVED, mode="pools").describe()
