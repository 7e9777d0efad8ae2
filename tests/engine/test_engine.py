"""engine.py's VRAM side: the prompt chunk a tight budget picks (pick_prefill_chunk), and an Engine over a
budget too tight for staging at 512 tokens that runs 256-token chunks through two small pools, with the
reference's tokens."""

import pytest
import torch

from hotexperts.engine.engine import (
    MIN_PREFILL_CHUNK,
    Engine,
    pick_prefill_chunk,
    vram_reserved,
    workspace_bytes,
)
from hotexperts.engine.presets import build_in_memory
from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import PlacementError
from hotexperts.experts.placement import Placement, PlacementPlan, Staging

CPU = torch.device("cpu")
CTX = 600


def _plan(tight: bool) -> PlacementPlan:
    return PlacementPlan({0: "cpu"}, staging=Staging(why="x", tight=tight) if tight else Staging(2, 4))


def test_pick_prefill_chunk_halves_while_staging_does_not_fit():
    tried = []

    def plan_at(chunk):
        tried.append(chunk)
        return _plan(tight=chunk > 128), chunk

    assert pick_prefill_chunk(512, plan_at) == (128, (_plan(False), 128)) and tried == [512, 256, 128]
    tried.clear()
    chunk, (plan, _) = pick_prefill_chunk(512, lambda c: (tried.append(c) or _plan(tight=True), c))
    assert chunk == 512 and plan.staging.tight and tried == [512, 256, 128]        # nothing helps: the first
    assert pick_prefill_chunk(100, lambda c: (_plan(True), c))[0] == 100            # never below the minimum


def test_pick_prefill_chunk_raises_the_first_error_when_nothing_plans():
    def plan_at(chunk):
        if chunk > MIN_PREFILL_CHUNK:
            raise PlacementError(f"too small at {chunk}")
        return _plan(True), chunk

    assert pick_prefill_chunk(512, plan_at)[0] == MIN_PREFILL_CHUNK               # the one that plans
    with pytest.raises(PlacementError, match="too small at 512"):
        pick_prefill_chunk(512, lambda c: (_ for _ in ()).throw(PlacementError(f"too small at {c}")))


@pytest.fixture(scope="module")
def loaded():
    return build_in_memory("tiny-qwen3-moe", dtype="float32", device="cpu")


def test_a_tight_budget_runs_smaller_prompt_chunks_through_small_pools(loaded):
    parts = vram_reserved(loaded, CTX, torch.float32, CPU, 256)
    slot = loaded.store.expert_nbytes
    least = 2 * -(-loaded.cfg.num_experts // 8) * slot                  # two pools of E / 8 experts
    assert workspace_bytes(loaded.cfg, torch.float32, 512, CTX) - parts["workspace"] > least
    budget = sum(parts.values()) + least
    p = Placement.parse("cpu", vram_budget=budget, prompt_mode="stream", pp_bypass=4)
    engine = Engine.from_loaded(loaded, CPU, p, max_context=CTX)
    ref = Engine.from_loaded(loaded, CPU, Placement.parse("gpu"), max_context=CTX)
    plan = engine.executor.plan
    assert engine.generator.prefill_chunk == 256 and plan.staging.pools == 2
    assert plan.staging.experts == -(-loaded.cfg.num_experts // 8)
    assert sum(v for k, v in plan.vram.items() if k != "total") <= budget
    prompt = list(range(3, 3 + 300))                                     # two chunks of <= 256
    params = SamplingParams(max_tokens=6, temperature=0.0)
    assert list(engine.generate(prompt, params)) == list(ref.generate(prompt, params))
    engine.close()
    ref.close()
