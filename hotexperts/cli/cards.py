"""Several cards from the user's commands: `--vram-budget 24,12` (a comma list = one budget per card).

    card_budgets(args) -> (bytes, ...) | None     several budgets (one per card, in card order), or None
                                                  for one value: one card, exactly as without this module
    generate_on_cards(args, budgets) -> int       `hotexperts generate` over the cards (engine/multi_gpu.py:
                                                  one process per card, the plan over the budgets, greedy)

Where a command cannot run over several cards, `flags._budget_arg` refuses the list with one error naming what
to use instead (serve, trace: they hold one Engine on one device). bench keeps its own meaning of a list
(`--vram-budget 16,24`: a sweep of single-card budgets, flags.vram_budgets).

generate over the cards runs one greedy request (engine/multi_gpu.py decodes greedily) and prints its text
when it is done (no streaming); the flags that need one Engine (sampling, stop strings, drafting, the cache's
statistics and plots, other placements) are refused with the reason, before anything loads. Cards: CUDA
devices 0..N-1 over NCCL when the machine has N, or --device cpu (and machines without CUDA): N processes
on this CPU over gloo, each an emulated card (what CI runs).
"""

from __future__ import annotations

import argparse
import sys

import torch

from hotexperts.cli.flags import warn
from hotexperts.engine.multi_gpu import CardRun, run_on_cards
from hotexperts.errors import HotExpertsError
from hotexperts.experts.multi_placement import parse_card_budgets

# generate's flags that need one Engine: (attribute, flag, its value when not given)
ONE_ENGINE_FLAGS = (
    ("placement", "--placement", None), ("experts", "--experts", None), ("cpu_moe", "--cpu-moe", False),
    ("n_cpu_moe", "--n-cpu-moe", None), ("moe_hot_k", "--moe-hot-k", None),
    ("moe_cache", "--moe-cache", None), ("moe_policy", "--moe-policy", None),
    ("moe_window", "--moe-window", None), ("moe_rebalance_interval", "--moe-rebalance-interval", None),
    ("moe_gpu_misses", "--moe-gpu-misses", None), ("moe_pp_bypass", "--moe-pp-bypass", 64),
    ("moe_max_swaps", "--moe-max-swaps", 4), ("moe_decode", "--moe-decode", "auto"),
    ("top_k", "--top-k", None), ("top_p", "--top-p", None), ("min_p", "--min-p", None),
    ("repetition_penalty", "--repeat-penalty", None), ("presence_penalty", "--presence-penalty", 0.0),
    ("frequency_penalty", "--frequency-penalty", 0.0), ("stop", "--stop", []), ("draft", "--draft", "none"),
    ("stats", "--stats", False), ("json", "--json", None), ("plots", "--plots", None),
    ("heatmap", "--heatmap", None), ("save_profile", "--save-profile", None), ("compile", "--compile", False),
    ("dense_quant", "--dense-quant", "auto"), ("embedding_on_gpu", "--embedding-on-gpu", False),
    ("cpu_exact", "--cpu-exact", False), ("gpu_moe_backend", "--gpu-moe-backend", "auto"),
    ("stage_copy", "--stage-copy", "auto"),
)
CARDS_TIMEOUT_S = 3600.0      # the whole run's limit (each card loads the model itself) and each collective's


def card_budgets(args: argparse.Namespace) -> tuple[int, ...] | None:
    """--vram-budget as one budget per card when it lists several ('24,12'); None for no or one value."""
    text = getattr(args, "vram_budget", None)
    if text is None or "," not in str(text):
        return None
    budgets = parse_card_budgets(text)
    return budgets if len(budgets) > 1 else None


def check_generate_flags(args: argparse.Namespace, cards: int) -> None:
    """One error for the first flag a run over several cards cannot honour."""
    given = [flag for attr, flag, unset in ONE_ENGINE_FLAGS if getattr(args, attr, unset) != unset]
    if args.temperature not in (None, 0.0):
        given.insert(0, "--temperature")
    if given:
        raise HotExpertsError(f"{given[0]} does not work with --vram-budget {args.vram_budget} ({cards} "
                              "cards): a run over several cards is one greedy request with the per-card "
                              "plan (docs/multi-gpu.md); leave it out, or give one budget to run on one card")


def card_backend(device: str | None, cards: int) -> str:
    """nccl over CUDA devices 0..cards-1, or gloo with every card emulated on this CPU (--device cpu, or no
    CUDA: a note says so); too few CUDA devices raise."""
    if device is not None and torch.device(device).type == "cpu":
        return "gloo"
    if not torch.cuda.is_available():
        if device is not None:
            raise HotExpertsError(f"device {device!r} requested but CUDA is not available")
        warn(f"no CUDA GPU: the {cards} cards are {cards} processes on this CPU (gloo), each with its budget")
        return "gloo"
    if torch.cuda.device_count() < cards:
        raise HotExpertsError(f"--vram-budget names {cards} cards but CUDA sees {torch.cuda.device_count()} "
                              "device(s): give one budget per visible card (or --device cpu to emulate them)")
    return "nccl"


def as_card_prompt(prompt: str | list[dict]):
    """generate's prompt for a CardRun: a text as is, chat messages as a tuple (CardRun is frozen)."""
    return prompt if isinstance(prompt, str) else tuple(prompt)


def generate_on_cards(args: argparse.Namespace, budgets: tuple[int, ...], prompt) -> int:
    """`hotexperts generate` as one greedy request over len(budgets) cards; prompt: text or chat messages."""
    check_generate_flags(args, len(budgets))
    cards = len(budgets)
    run = CardRun(args.model, cards, budgets, modes=("auto",), prompts=(prompt,), max_tokens=args.max_tokens,
                  dtype=args.dtype, backend=card_backend(args.device, cards), max_context=args.max_context,
                  expert_quant=args.expert_quant, profile=args.moe_profile, timeout_s=CARDS_TIMEOUT_S)
    card0 = run_on_cards(run)[0]
    res = card0["modes"]["auto"]
    req = res["requests"][0]
    sys.stdout.write(req["text"] + "\n")
    sys.stdout.flush()
    print(f"prompt: {len(req['prompt'])} tokens, {req['prompt_tps']:.1f} tok/s | generation: "
          f"{len(req['tokens'])} tokens, {req['decode_tps']:.1f} tok/s | {cards} cards "
          f"({card0['device']})", file=sys.stderr)
    print(res["plan"].describe(), file=sys.stderr)
    return 0
