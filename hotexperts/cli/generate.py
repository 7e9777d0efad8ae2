"""`hotexperts generate`: stream a completion of one prompt to stdout.

    hotexperts generate --model DIR|FILE.gguf|preset:NAME --prompt "..." [--chat] [--system S]
        [--max-tokens N] [--temperature T --top-k K --top-p P --min-p M --seed S] [--stop S ...]
        [--draft ngram|mtp|none --draft-max N --draft-min N --draft-always]   (speculative decoding)
        [model flags] [placement flags] [kernel flags] [--stats]     (the shared flags: cli/flags.py)
    hotexperts generate ... --vram-budget 24,12     one budget per card: one greedy request over the cards
                                                    (cli/cards.py, engine/multi_gpu.py; printed when done)

Text goes to stdout as it is generated; the summary line
"prompt: N tokens, X tok/s | generation: M tokens, Y tok/s" (and, with --stats, the engine's stats as
JSON) goes to stderr, so stdout holds only the completion. Sampling flags left out take the model's
generation_config values (sampling.generation_defaults: greedy unless it sets do_sample), as the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hotexperts.cli.cards import as_card_prompt, card_budgets, generate_on_cards
from hotexperts.cli.flags import (
    HelpFormatter,
    add_json_argument,
    add_kernel_arguments,
    add_max_tokens_argument,
    add_model_arguments,
    add_placement_arguments,
    add_plots_argument,
    add_seed_argument,
    load_engine,
)
from hotexperts.engine.engine import Engine
from hotexperts.engine.sampling import SamplingParams, generation_defaults, model_generation_config
from hotexperts.engine.speculative import SpecConfig
from hotexperts.engine.textstream import TextStream
from hotexperts.errors import HotExpertsError

GENERATE_DESCRIPTION = """\
Stream a completion of one prompt to stdout; the speed summary (and --stats) go to stderr.

examples:
  hotexperts generate -m preset:tiny-qwen3-moe -p "Hello"
  hotexperts generate -m model.gguf -p "Why is the sky blue?" --chat -n 200 --moe-cache 8GiB
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt",
                              description=GENERATE_DESCRIPTION, formatter_class=HelpFormatter)
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (implies --chat)")
    add_max_tokens_argument(p, 256)
    p.add_argument("--temperature", "--temp", dest="temperature", type=float, default=None,
                   help="0 = greedy (default: the model's generation_config; greedy without one)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off (default: generation_config's, else 0)")
    p.add_argument("--top-p", type=float, default=None, help="1 = off (default: generation_config's, else 1)")
    p.add_argument("--min-p", type=float, default=None, help="0 = off (default: generation_config's, else 0)")
    p.add_argument("--repeat-penalty", "--repetition-penalty", dest="repetition_penalty", type=float,
                   default=None, help="penalize tokens already in the prompt or output (1 = off; default: "
                                      "generation_config's, else 1)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2] (default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2] (default 0)")
    add_seed_argument(p, "sampling (default: a new one each run)", default=None)
    p.add_argument("--stop", nargs="+", action="extend", default=[], metavar="S", help="stop strings")
    p.add_argument("--stats", action="store_true",
                   help="print the cache per layer: hits, misses, swaps, bytes moved, CPU/GPU time")
    add_json_argument(p, "the engine's statistics", legacy=("--stats-json",))
    add_plots_argument(p, "the cache's per-layer hit-rate heatmap, layer_heatmap.png")
    p.add_argument("--heatmap", default=None, metavar="PNG",
                   help="the same heatmap as --plots, written to the file PNG")
    p.add_argument("--save-profile", default=None, metavar="FILE",
                   help="write the cache's current hot set as a routing profile (--moe-profile FILE)")
    add_draft_arguments(p)
    add_placement_arguments(p)
    add_kernel_arguments(p)


def add_draft_arguments(p) -> None:
    """Speculative decoding (engine/speculative.py); llama.cpp's --draft-max / --draft-min where the meaning
    matches (llama.cpp's `--draft N` is --draft-max N here: --draft names the drafter)."""
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft", default="none", metavar="ngram|mtp|none",
                   help="drafter: ngram (prompt lookup, any model), mtp (not written yet), none (default)")
    g.add_argument("--draft-max", "--draft-n", dest="draft_max", type=int, default=SpecConfig.draft_max,
                   help=f"tokens to draft at most per step, 1..15 (default {SpecConfig.draft_max})")
    g.add_argument("--draft-min", type=int, default=SpecConfig.draft_min,
                   help=f"fewer drafted tokens than this: a plain step (default {SpecConfig.draft_min})")
    g.add_argument("--draft-always", action="store_true",
                   help="keep drafting even when it measures slower than plain decoding (no off-switch)")


def spec_config(args: argparse.Namespace) -> SpecConfig:
    """The drafting flags as a SpecConfig (its checks give the error messages)."""
    method = str(args.draft)
    if method.isdigit():
        raise HotExpertsError(f"--draft names the drafter (ngram, mtp, none); llama.cpp's --draft {method} "
                              f"is --draft-max {method} here")
    return SpecConfig(method, draft_max=args.draft_max, draft_min=args.draft_min,
                      auto_off=not args.draft_always)


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def sampling_params(args: argparse.Namespace, defaults: dict | None = None) -> SamplingParams:
    """The flags; the ones left out from `defaults` (generation_defaults), else SamplingParams'."""
    given = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    return SamplingParams(**{**(defaults or {}), **given}, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, seed=args.seed,
                          max_tokens=args.max_tokens, stop=tuple(args.stop))


def prompt_messages(prompt: str, chat: bool = False, system: str | None = None) -> str | list[dict]:
    """The prompt as given (plain), or as chat messages (--chat / --system) for the chat template."""
    if not (chat or system):
        return prompt
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return messages


def encode_prompt(tokenizer, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """Plain prompts are encoded with the tokenizer's special tokens; chat prompts via the chat template."""
    text = prompt_messages(prompt, chat, system)
    return tokenizer.encode(text) if isinstance(text, str) else tokenizer.encode_chat(text)


def summary_line(stats: dict) -> str:
    last = stats["last"]
    line = (f"prompt: {last['prompt_tokens']} tokens, {last['prompt_tok_per_s']:.1f} tok/s | "
            f"generation: {last['gen_tokens']} tokens, {last['gen_tok_per_s']:.1f} tok/s")
    spec = stats.get("speculative") or {}
    if spec.get("method", "none") != "none":
        s = spec["last"]
        line += (f" | draft {spec['method']}: {s['accepted']}/{s['drafted']} accepted, "
                 f"{s['tokens_per_step']:.2f} tokens per verify step ({s['verify_steps']} steps), "
                 f"switch {spec['switch']}")
    return line


def run(args: argparse.Namespace) -> int:
    sampling_params(args)                               # validate flags before loading anything
    spec = spec_config(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    budgets = card_budgets(args)                        # --vram-budget 24,12: one budget per card
    if budgets is not None:
        messages = prompt_messages(prompt, args.chat, args.system)
        return generate_on_cards(args, budgets, as_card_prompt(messages))
    engine = load_engine(args, speculative=spec)
    params = sampling_params(args, generation_defaults(model_generation_config(engine)))
    if engine.tokenizer is None:
        raise HotExpertsError(f"{args.model} has no tokenizer (tokenizer.json); generate needs one")
    check_cache_flags(engine, args)                     # before generating, not after
    ids = encode_prompt(engine.tokenizer, prompt, args.chat, args.system)
    if args.compile:                                    # compile + capture outside the timed request
        print(f"compiled the decode step in {engine.warm_up():.1f}s", file=sys.stderr)
    if args.stats:
        engine.executor.set_gpu_timing(True)            # per-layer GPU time with CUDA events
    stream = TextStream(engine.tokenizer, params.stop)
    for delta in stream.run(engine.generate(ids, params)):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    stats = engine.stats()
    print(summary_line(stats), file=sys.stderr)
    report_cache(engine, args, stats)
    return 0


def check_cache_flags(engine: Engine, args: argparse.Namespace) -> None:
    """--heatmap and --save-profile need a hybrid cache: say so before any work."""
    flags = (("--heatmap", args.heatmap), ("--plots", args.plots), ("--save-profile", args.save_profile))
    for flag, value in flags:
        if value and engine.executor.cache_stats is None:
            raise HotExpertsError(f"{flag} needs an expert cache (--n-cpu-moe, --moe-hot-k or --moe-cache)")


def heatmap_paths(args: argparse.Namespace) -> list[str]:
    """--heatmap PNG and --plots DIR (DIR/layer_heatmap.png, the name simulate --plots uses)."""
    paths = [args.heatmap] if args.heatmap else []
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        paths.append(str(Path(args.plots) / "layer_heatmap.png"))
    return paths


def report_cache(engine: Engine, args: argparse.Namespace, stats: dict) -> None:
    """--stats table, --json, --heatmap / --plots and --save-profile (the last ones need a hybrid cache)."""
    cache = engine.executor.cache_stats
    if args.stats:
        print(cache.table() if cache is not None else "no expert cache in this placement", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=2, default=str)
    check_cache_flags(engine, args)
    for png in heatmap_paths(args):
        print(f"heatmap: {cache.heatmap(png)}", file=sys.stderr)
    if args.save_profile:
        print(f"profile: {engine.executor.export_profile(args.save_profile)}", file=sys.stderr)
