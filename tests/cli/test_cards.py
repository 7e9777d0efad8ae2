"""`--vram-budget 24,12` in the user's commands (cli/cards.py, issue 23): one value stays one card exactly as
before; a list runs generate over that many cards (emulated on the CPU over gloo here: the multi-GPU code
path) with the one-card text, refuses what such a run cannot honour before anything loads, and serve refuses
it with what to use instead."""

import re

import pytest
import torch

from hotexperts.cli import build_parser, main
from hotexperts.cli.cards import ONE_ENGINE_FLAGS, card_backend, card_budgets
from hotexperts.cli.flags import placement_from_args
from hotexperts.errors import HotExpertsError, PlacementError
from hotexperts.experts.budget import GiB, MiB

TINY = ["generate", "-m", "preset:tiny-qwen3-moe", "--dtype", "fp32", "-c", "64", "-p", "Hello there",
        "-n", "6"]


def generate_args(*extra: str):
    return build_parser().parse_args([*TINY, *extra])


@pytest.mark.parametrize("text", [None, "24", "512MiB", "auto"])
def test_no_list_means_one_card(text):
    assert card_budgets(generate_args(*(["--vram-budget", text] if text else []))) is None


def test_a_list_is_one_budget_per_card_in_card_order():
    assert card_budgets(generate_args("--vram-budget", "24,512MiB")) == (24 * GiB, 512 * MiB)
    with pytest.raises(PlacementError, match="per-card budgets"):
        card_budgets(generate_args("--vram-budget", "24,"))


def test_one_budget_places_exactly_as_before():
    placement = placement_from_args(generate_args("--vram-budget", "24"))
    assert placement.vram_budget == 24 * GiB
    assert placement == placement_from_args(generate_args("--vram-budget", "24GiB"))


def test_the_unset_values_are_generate_s_defaults():
    """ONE_ENGINE_FLAGS names each flag's 'not given' value: it must be what the parser gives."""
    args = generate_args()
    for attr, flag, unset in ONE_ENGINE_FLAGS:
        assert getattr(args, attr) == unset, flag


@pytest.mark.parametrize("flag", [["--temperature", "0.8"], ["--moe-cache", "1"], ["--n-cpu-moe", "1"],
                                  ["--stop", "."], ["--draft", "ngram"], ["--stats"], ["--top-p", "0.9"]])
def test_generate_over_cards_refuses_what_it_cannot_honour(flag, capsys):
    rc = main([*TINY, "--vram-budget", "1,1", "--device", "cpu", *flag])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert f"error: {flag[0]} does not work with --vram-budget 1,1 (2 cards)" in err


def test_serve_runs_on_one_card_and_says_what_to_use(capsys):
    rc = main(["serve", "-m", "preset:tiny-qwen3-moe", "--device", "cpu", "--vram-budget", "24,12"])
    err = capsys.readouterr().err
    assert rc == 2 and "runs on one card" in err and "hotexperts generate --vram-budget 24,12" in err


def test_card_backend(monkeypatch, capsys):
    assert card_backend("cpu", 2) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert card_backend(None, 2) == "gloo" and "2 processes on this CPU" in capsys.readouterr().err
    with pytest.raises(HotExpertsError, match="CUDA is not available"):
        card_backend("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(HotExpertsError, match="sees 1 device"):
        card_backend(None, 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert card_backend(None, 2) == "nccl"


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True])
def test_generate_over_two_emulated_cards_prints_the_one_card_text(chat, capsys):
    """Two card processes over gloo, budgets that leave experts to the CPU card too: the greedy text of
    the single-device run, and the plan on stderr."""
    extra = ["--temperature", "0", "--device", "cpu", *(["--chat"] if chat else [])]
    assert main([*TINY, *extra]) == 0
    one = capsys.readouterr().out
    assert main([*TINY, *extra[2:], "--vram-budget", "134MiB,133.5MiB"]) == 0    # 14/16 at 134 MiB each
    out, err = capsys.readouterr()
    assert out == one and len(one.strip()) > 0
    held, experts = map(int, re.search(r"(\d+)/(\d+) experts per layer on the cards", err).groups())
    assert "2 cards (cpu)" in err and 0 < held < experts           # the CPU card computes some experts


@pytest.mark.slow
def test_a_budget_too_small_for_a_card_says_so(capsys):
    """One card stops on its PlacementError, the other on the closed connection: the user sees the first."""
    assert main([*TINY, "--device", "cpu", "--vram-budget", "100MiB,100MiB"]) == 2
    err = capsys.readouterr().err
    assert "card 0's budget" in err and "smaller than" in err and "Connection closed" not in err
