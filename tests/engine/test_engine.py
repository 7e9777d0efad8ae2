"""engine.py's VRAM side: the prompt chunk a tight budget picks (pick_prefill_chunk: every expert resident
at a smaller chunk first, then staging that fits), the cuBLAS workspace a tight budget turns off, the step
memory of N sequence slots and verify steps in the plan, and Engines over budgets computed from the plan
itself, with the reference's tokens."""

import os

import pytest
import torch

from hotexperts.engine.engine import (
    CUBLAS_ENV,
    CUBLAS_OURS,
    MIN_PREFILL_CHUNK,
    Engine,
    cublas_stream_bytes,
    pick_prefill_chunk,
    prepare_cublas_workspace,
    reserved_parts,
    vram_reserved,
    workspace_bytes,
)
from hotexperts.engine.presets import build_in_memory
from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import PlacementError
from hotexperts.experts.placement import Placement, PlacementPlan, Staging
from hotexperts.experts.solve import every_expert_resident

CPU = torch.device("cpu")
CTX = 600
E = 4                                     # experts per layer of the synthetic plans below


def _plan(tight: bool) -> PlacementPlan:
    return PlacementPlan({0: "cpu"}, staging=Staging(why="x", tight=tight) if tight else Staging(2, 4))


def _resident() -> PlacementPlan:
    return PlacementPlan({0: "gpu", 1: "gpu"}, Placement.parse("layers:auto"),
                         staging=Staging(why="every expert resident"))


def _hybrid() -> PlacementPlan:                  # layer 0 on the CPU, staging that fits
    return PlacementPlan({0: "cpu", 1: "gpu"}, Placement.parse("layers:auto"), staging=Staging(2, 4))


def test_pick_prefill_chunk_halves_while_staging_does_not_fit():
    tried = []

    def plan_at(chunk):
        tried.append(chunk)
        return _plan(tight=chunk > 128), chunk

    assert pick_prefill_chunk(512, plan_at, E) == (128, (_plan(False), 128)) and tried == [512, 256, 128]
    tried.clear()
    chunk, (plan, _) = pick_prefill_chunk(512, lambda c: (tried.append(c) or _plan(tight=True), c), E)
    assert chunk == 512 and plan.staging.tight and tried == [512, 256, 128]        # nothing helps: the first
    assert pick_prefill_chunk(100, lambda c: (_plan(True), c), E)[0] == 100        # never below the minimum


def test_pick_prefill_chunk_raises_the_first_error_when_nothing_plans():
    def plan_at(chunk):
        if chunk > MIN_PREFILL_CHUNK:
            raise PlacementError(f"too small at {chunk}")
        return _plan(True), chunk

    assert pick_prefill_chunk(512, plan_at, E)[0] == MIN_PREFILL_CHUNK               # the one that plans
    with pytest.raises(PlacementError, match="too small at 512"):
        pick_prefill_chunk(512, lambda c: (_ for _ in ()).throw(PlacementError(f"too small at {c}")), E)


def test_pick_prefill_chunk_prefers_a_smaller_chunk_that_keeps_every_expert_resident():
    plans = {512: _hybrid(), 256: _plan(False), 128: _resident()}
    chunk, (plan, _) = pick_prefill_chunk(512, lambda c: (plans[c], c), E)
    assert chunk == 128 and plan.layers("cpu") == []
    assert plan.notes == ("prompt chunk 128, not 512: its smaller workspace makes every expert resident, "
                          "512 leaves 4 experts off the GPU (1 MoE layers on the CPU)",)
    assert "prompt chunk 128, not 512" in plan.describe()
    plans[256] = _resident()                                             # the largest resident one wins
    assert pick_prefill_chunk(512, lambda c: (plans[c], c), E)[0] == 256
    plans[512] = _resident()                                             # resident at the default: no note
    chunk, (plan, _) = pick_prefill_chunk(512, lambda c: (plans[c], c), E)
    assert chunk == 512 and plan.notes == ()


def test_pick_prefill_chunk_says_when_the_default_chunk_does_not_plan_at_all():
    def plan_at(chunk):
        if chunk == 512:
            raise PlacementError("too small")
        return _resident(), chunk

    chunk, (plan, _) = pick_prefill_chunk(512, plan_at, E)
    assert chunk == 256 and plan.notes[0].endswith("512 does not plan at all")


def test_a_tight_budget_turns_the_cublas_workspace_off_before_the_first_matmul(monkeypatch):
    monkeypatch.delenv(CUBLAS_ENV, raising=False)
    monkeypatch.delenv(CUBLAS_OURS, raising=False)
    assert prepare_cublas_workspace(lambda c: (_resident(), c), 512) == ""     # every expert fits: default
    assert CUBLAS_ENV not in os.environ
    tried = []

    def never(chunk):
        tried.append(chunk)
        raise PlacementError("does not fit")

    note = prepare_cublas_workspace(never, 512)
    assert tried == [512, 256, 128] and note.startswith("cuBLAS workspace off (CUBLAS_WORKSPACE_CONFIG=:0:0")
    assert os.environ[CUBLAS_ENV] == ":0:0" and cublas_stream_bytes() == 0
    again = prepare_cublas_workspace(never, 512)                            # a later engine: kept, said
    assert again == "cuBLAS workspace CUBLAS_WORKSPACE_CONFIG=:0:0 (set by hotexperts, for a tight budget " \
        "earlier in this process)" and tried == [512, 256, 128]


def test_a_cublas_workspace_the_user_set_is_never_overridden(monkeypatch):
    monkeypatch.setenv(CUBLAS_ENV, ":4096:8")
    monkeypatch.delenv(CUBLAS_OURS, raising=False)
    note = prepare_cublas_workspace(lambda c: (_ for _ in ()).throw(PlacementError("no")), 512)
    assert note == "cuBLAS workspace CUBLAS_WORKSPACE_CONFIG=:4096:8 (set by the user)"
    assert os.environ[CUBLAS_ENV] == ":4096:8" and cublas_stream_bytes() == 32 * 2**20
    monkeypatch.setenv(CUBLAS_ENV, ":4096:2:16:8")
    assert cublas_stream_bytes() == (4096 * 2 + 16 * 8) * 1024
    monkeypatch.delenv(CUBLAS_ENV)
    assert cublas_stream_bytes() == 32 * 2**20                             # torch's default on the H100


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


def _same_tokens(engine, ref, prompt_len: int = 300) -> None:
    prompt = list(range(3, 3 + prompt_len))                              # several prompt chunks
    params = SamplingParams(max_tokens=6, temperature=0.0)
    assert list(engine.generate(prompt, params)) == list(ref.generate(prompt, params))


@pytest.mark.parametrize("text", ["layers:auto", "cache:auto"])
def test_a_budget_that_holds_every_expert_only_at_a_smaller_chunk_runs_all_resident(loaded, text):
    parts = reserved_parts(loaded, CTX, torch.float32, CPU, MIN_PREFILL_CHUNK)
    budget = sum(parts.values()) + loaded.store.nbytes                  # every expert at 128, not at 256
    p = Placement.parse(text, vram_budget=budget, prompt_mode="stream", pp_bypass=4)
    engine = Engine.from_loaded(loaded, CPU, p, max_context=CTX)
    ref = Engine.from_loaded(loaded, CPU, Placement.parse("gpu"), max_context=CTX)
    plan = engine.executor.plan
    assert engine.generator.prefill_chunk == MIN_PREFILL_CHUNK
    assert every_expert_resident(plan, loaded.cfg.num_experts) and not plan.staging
    assert sum(v for k, v in plan.vram.items() if k != "total") <= budget
    assert "prompt chunk 128, not 512: its smaller workspace makes every expert resident" in plan.describe()
    one_byte_less = Engine.from_loaded(loaded, CPU, Placement.parse(text, vram_budget=budget - 1,
                                                                    prompt_mode="stream", pp_bypass=4),
                                       max_context=CTX)
    assert not every_expert_resident(one_byte_less.executor.plan, loaded.cfg.num_experts)
    _same_tokens(engine, ref)
    for e in (engine, ref, one_byte_less):
        e.close()


def test_the_plan_makes_room_for_n_sequence_slots_and_verify_steps_by_shrinking_the_cache(loaded):
    many = reserved_parts(loaded, CTX, torch.float32, CPU, MIN_PREFILL_CHUNK, parallel=4, verify_tokens=8)
    one = reserved_parts(loaded, CTX, torch.float32, CPU, MIN_PREFILL_CHUNK)
    assert many["kv"] == 4 * one["kv"] and many["batch"] > 0 and many["verify"] > 0
    assert "graphs" not in many and set(one) == {"dense", "kv", "workspace"}       # CPU: no graph pools
    budget = sum(many.values()) + loaded.store.nbytes // 2              # half the experts at chunk 128
    p = Placement.parse("cache:auto", vram_budget=budget)
    single = Engine.from_loaded(loaded, CPU, p, max_context=CTX)
    batched = Engine.from_loaded(loaded, CPU, p, max_context=CTX, parallel=4, verify_tokens=8)
    a, b = single.executor.plan, batched.executor.plan
    assert b.vram["kv"] == many["kv"] and b.vram["batch"] == many["batch"] and b.vram["verify"] > 0
    half = loaded.store.nbytes // 2 // loaded.store.expert_nbytes
    assert a.shared_slots == 64 and b.shared_slots == half == 32                   # tiny: 4 layers x 16
    assert sum(v for k, v in b.vram.items() if k != "total") <= budget
    with pytest.raises(PlacementError, match=r"smaller than the CUDA context.*batch"):
        Engine.from_loaded(loaded, CPU, Placement.parse("cache:auto", vram_budget=sum(many.values()) - 1),
                           max_context=CTX, parallel=4, verify_tokens=8)
    single.close()
    batched.close()
