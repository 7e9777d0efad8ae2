"""Two cards over torch.distributed (engine/multi_gpu.py), each card's process on the CPU with gloo: the same
code path as nccl on two GPUs. Greedy tokens equal the single-device engine's, logits agree within fp32
tolerance (and bit for bit between the cards), for both expert layouts, with experts on the CPU too; a card
that fails or hangs ends the run with an error instead of hanging CI."""

import os
import time

import pytest
import torch

from hotexperts.engine.engine import Engine, vram_reserved
from hotexperts.engine.multi_gpu import CardRun, launch, main, prompt_ids, run_on_cards
from hotexperts.engine.presets import build_in_memory
from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import ExpertComputeError, HotExpertsError
from hotexperts.experts.reference import DenseExecutor
from hotexperts.kernels.cpu_build import load_extension

PRESET, CTX, N = "tiny-qwen3-moe", 64, 8
PROMPTS = ((5, 17, 300, 2, 77, 900, 41, 8, 123, 64, 3), (44, 12, 600, 7))
CPU = torch.device("cpu")


def reference(loaded):
    """The single-device engine (every expert in the DenseExecutor): per prompt (last logits, tokens)."""
    ex = DenseExecutor({l: loaded.store.layer(l) for l in loaded.store.layers}, "cpu", torch.float32)
    engine = Engine.from_loaded(loaded, CPU, executor=ex, max_context=CTX)
    engine.generator.prefill_chunk = 4
    out = []
    for p in PROMPTS:
        logits = engine.prefill(list(p))
        out.append((logits, list(engine.generate(list(p), SamplingParams(max_tokens=N)))))
    return out


@pytest.fixture(scope="module")
def two_cards():
    """One 2-card run of both layouts; card budgets of 24 and 12 experts beside the dense part."""
    load_extension("native")                       # built here once, so the cards' processes only load it
    loaded = build_in_memory(PRESET, dtype="float32", device="cpu")
    reserved = sum(vram_reserved(loaded, CTX, torch.float32, CPU).values())
    eb = loaded.store.expert_nbytes
    run = CardRun(f"preset:{PRESET}", 2, (reserved + 24 * eb, reserved + 12 * eb), ("sharded", "pools"),
                  PROMPTS, N, max_context=CTX, prefill_chunk=4, backend="gloo", timeout_s=150)
    return reference(loaded), run_on_cards(run)


@pytest.mark.parametrize("mode", ["sharded", "pools"])
def test_two_cards_generate_the_single_device_tokens(two_cards, mode):
    ref, cards = two_cards
    for card in cards:
        requests = card["modes"][mode]["requests"]
        for req, (ref_logits, ref_tokens) in zip(requests, ref, strict=True):
            assert req["tokens"] == ref_tokens
            torch.testing.assert_close(req["logits"], ref_logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(cards[0]["modes"][mode]["requests"], cards[1]["modes"][mode]["requests"], strict=True):
        assert torch.equal(a["logits"], b["logits"])                   # the all-reduce agrees everywhere
    assert len(set(ref[0][1])) >= 3, "degenerate generation: the test would not discriminate"


def test_both_cards_ran_one_plan_with_cpu_experts(two_cards):
    _, cards = two_cards
    sharded = [c["modes"]["sharded"]["plan"] for c in cards]
    assert sharded[0] == sharded[1] and sharded[0].mode == "sharded"
    rows = [c.rows for c in sharded[0].cards]
    assert rows[0][1] - rows[0][0] > rows[1][1] - rows[1][0] > 0       # the larger budget, more rows
    pools = cards[0]["modes"]["pools"]["plan"]
    assert pools.mode == "pools" and pools.cards[0].slots > pools.cards[1].slots > 0
    for plan in (sharded[0], pools):
        assert all(plan.cpu_experts(l) and plan.resident(l) for l in plan.moe_layers)
    assert cards[0]["device"] == cards[1]["device"] == "cpu"


def fail_on_card_one(rank):
    """Card 1 raises while card 0 waits for it in a collective."""
    if rank == 1:
        raise ValueError("card one broke")
    time.sleep(120)


def hang_on_card_one(rank):
    if rank == 1:
        time.sleep(120)


def test_a_failing_card_ends_the_run():
    t0 = time.monotonic()
    with pytest.raises(ExpertComputeError, match="card 1 failed(.|\n)*card one broke"):
        launch(fail_on_card_one, 2, (), timeout_s=60)
    assert time.monotonic() - t0 < 30


def test_a_hanging_card_is_killed_at_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(ExpertComputeError, match="did not finish within 3 s"):
        launch(hang_on_card_one, 2, (), timeout_s=3)
    assert time.monotonic() - t0 < 20


def test_bad_runs_are_refused_before_any_process(capsys):
    with pytest.raises(HotExpertsError, match="1 budget"):
        CardRun("preset:x", 2, (None,))
    with pytest.raises(HotExpertsError, match="gloo or nccl"):
        CardRun("preset:x", 1, (None,), backend="mpi")
    assert main(["--model", f"preset:{PRESET}", "--cards", "2", "--vram-budget", "1,2,3"]) == 2
    assert "names 3 card(s) but 2" in capsys.readouterr().out


def test_no_card_process_is_left_running():
    """Every card's process is gone (multiprocessing's own resource tracker may stay)."""
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _card_process_of_us(int(p))]


def _card_process_of_us(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline") as f:
            return parent == os.getpid() and "spawn_main" in f.read()
    except (OSError, ValueError, IndexError):
        return False


def test_a_prompt_is_ids_a_text_or_chat_messages():
    tok = build_in_memory(PRESET, dtype="float32", device="cpu").tokenizer
    chat = ({"role": "user", "content": "Hello"},)
    assert prompt_ids(tok, (5, 17, 300)) == [5, 17, 300]
    assert prompt_ids(tok, "Hello") == tok.encode("Hello")
    assert prompt_ids(tok, chat) == tok.encode_chat(list(chat)) != tok.encode("Hello")
    assert prompt_ids(None, (5, 17)) == [5, 17]
    with pytest.raises(HotExpertsError, match="no tokenizer"):
        prompt_ids(None, "Hello")
