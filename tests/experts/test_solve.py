"""solve: the prompt staging pools and the dequantize chunk traded against slots under one VRAM budget
(experts/solve.py's rules), and every plan's parts adding up under its budget."""

import pytest

from hotexperts.experts.budget import Budget
from hotexperts.experts.placement import Placement
from hotexperts.experts.solve import MIN_DEQUANT_CHUNK, STAGING_SHARE, ModelSizes, solve

E, L, SB = 16, 4, 1000                       # 16 experts per layer, 4 MoE layers, 1000-byte slots
LAYER = E * SB
RESERVED = 5000


def sizes(staging=True, dequant=0, chunk=0):
    return ModelSizes(tuple(range(L)), E, SB, 2 * LAYER if staging else 0, 0, dequant, chunk)


def plan(text, free, **kw):
    total = None if free is None else RESERVED + free
    return solve(Placement.parse(text), sizes(**kw), Budget(total, RESERVED, SB, {"dense": RESERVED}))


def used(p) -> int:
    return sum(v for k, v in p.vram.items() if k != "total")


@pytest.mark.parametrize("text, free", [("gpu", L * LAYER), ("layers:auto", L * LAYER), ("layers:0", None),
                                        (f"hot:{E}", None), ("cache:auto", L * LAYER + 7),
                                        ("cache:auto", None), ("0-1=gpu,2-3=shared", L * LAYER)])
def test_no_staging_when_every_expert_is_resident(text, free):
    p = plan(text, free)
    assert not p.staging and p.staging.why == "every expert resident" and p.vram["staging"] == 0
    assert p.num_slots(E) == E * L or p.dense


def test_cpu_moe_staging_shrinks_with_the_budget_then_goes():
    assert (plan("cpu", 3 * LAYER).staging.pools, plan("cpu", 3 * LAYER).staging.experts) == (2, E)
    half = plan("cpu", LAYER).staging                          # one layer's bytes: two pools of half a layer
    assert (half.pools, half.experts) == (2, E // 2)
    tight = plan("cpu", 2 * SB * (E // 8) - 1)                 # less than two pools of E / 8 experts
    assert not tight.staging and "too tight" in tight.staging.why and "hybrid path" in tight.describe()
    assert not plan("cpu", 3 * LAYER, staging=False).staging                   # not wanted (no CUDA)


def test_layer_offload_puts_slots_first_and_stages_from_the_rest():
    free = 3 * LAYER + LAYER // 2                              # 3 GPU layers + half a layer
    p = plan("layers:auto", free)
    assert p.layers("cpu") == [0] and (p.staging.pools, p.staging.experts) == (2, E // 4)
    assert used(p) <= p.vram["total"] and p.vram["staging"] == 2 * (E // 4) * SB
    squeezed = plan("layers:auto", 3 * LAYER + 1)             # no room for a pool beside 3 GPU layers
    assert squeezed.layers("cpu") == [0, 1] and squeezed.staging.experts == E // 2
    fixed = plan("layers:1", 3 * LAYER + 1)                   # asked for: the slots, no staging
    assert fixed.layers("cpu") == [0] and not fixed.staging


def test_budget_sized_cache_gives_staging_at_most_a_share():
    free = 2 * LAYER
    p = plan("cache:auto", free)
    assert p.vram["staging"] <= free // STAGING_SHARE and p.staging.pools == 2
    assert p.shared_slots == (free - p.vram["staging"]) // SB and used(p) <= p.vram["total"]
    big = plan("cache:auto", 3 * LAYER + LAYER // 2)           # a quarter of it: two pools of 7 experts
    assert big.staging.experts == min(E, (3 * LAYER + LAYER // 2) // STAGING_SHARE // (2 * SB))
    hot = plan("hot:auto", 2 * LAYER)
    assert hot.where[0] == (2 * LAYER - hot.vram["staging"]) // SB // L and hot.staging


def test_dequantize_chunk_is_counted_only_with_gpu_experts_and_shrinks_when_tight():
    kw = {"dequant": 3 * SB, "chunk": 27}
    roomy = plan("cache:auto", 1000 * LAYER, **kw)
    assert roomy.dequant_chunk == 27 and roomy.vram["dense"] == RESERVED
    tight = plan("cache:auto", 2 * LAYER, **kw)
    assert MIN_DEQUANT_CHUNK <= tight.dequant_chunk < 27 and used(tight) <= tight.vram["total"]
    cpu = plan("cpu", SB, **kw)                                # no slot, no staging: no dequantize buffer
    assert cpu.dequant_chunk == 0 and not cpu.staging and used(cpu) == RESERVED


def test_all_gpu_with_the_smallest_dequantize_chunk_when_only_that_fits():
    kw = {"dequant": 3 * SB, "chunk": 27}
    free = L * LAYER + MIN_DEQUANT_CHUNK * 3 * SB              # every expert + the smallest chunk
    p = plan("layers:auto", free, **kw)
    assert p.layers("cpu") == [] and p.dequant_chunk == MIN_DEQUANT_CHUNK and not p.staging
    assert used(p) == p.vram["total"]


def test_every_plan_fits_its_budget():
    kw = {"dequant": 2 * SB, "chunk": 8}
    for text in ("cpu", "layers:auto", "hot:auto", "cache:auto", "cache:20slots", "0=cpu,1-3=shared"):
        for free in (2 * SB, LAYER, 2 * LAYER + 3, 3 * LAYER, 5 * LAYER):
            p = plan(text, free, **kw)
            assert used(p) <= p.vram["total"], (text, free, p.describe())
