"""`hotexperts trace`: record, import or synthesize a routing trace (.npz, trace/format.py).

    hotexperts trace --model DIR|FILE.gguf|preset:NAME (--prompts FILE | --chat FILE.jsonl) [--max-tokens N]
                     --out F.npz                      live routing of greedy generation (trace/record.py)
    hotexperts trace --import SRC --out F.npz         SRC: shared-trace name, .route.csv, *_routing.jsonl, dir
    hotexperts trace --synthetic PRESET [--tokens N] [--seed S] --out F.npz
    add --stats to print the trace's locality statistics (decode tokens).
--prompts: one user message per non-empty line (chat template applied; --raw to encode as is).
--chat: one JSON transcript per line ({"messages": [...]} or a bare list).
"""

from __future__ import annotations

import argparse

from hotexperts.cli.flags import (
    add_kernel_arguments,
    add_placement_arguments,
    kernel_options_from_args,
    placement_from_args,
)
from hotexperts.engine.engine import Engine
from hotexperts.engine.load import DTYPES
from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import HotExpertsError
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.import_shared import import_trace
from hotexperts.trace.record import encode_prompts, read_prompts, record
from hotexperts.trace.stats import format_table, summarize
from hotexperts.trace.synthetic import generate, preset


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("trace", help="record, import or synthesize a routing trace (.npz)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory or preset:NAME (records live routing)")
    src.add_argument("--import", dest="import_src", metavar="SRC",
                     help="convert a real trace: mixtral-8x7b | qwen3-30b-a3b | gemma-4-26b-a4b | "
                          "gpt-oss-120b (from ../shared/traces), or a .route.csv / *_routing.jsonl / "
                          "folder / .npz")
    src.add_argument("--synthetic", metavar="PRESET",
                     help="generate: qwen3-30b-a3b | mixtral-8x7b | flat-512")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", metavar="FILE", help="one prompt per line")
    prompts.add_argument("--chat", metavar="FILE.jsonl", help="one JSON transcript per line")
    p.add_argument("--raw", action="store_true", help="encode --prompts lines without the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--tokens", type=int, default=None, help="--synthetic: number of tokens")
    p.add_argument("--seed", type=int, default=None, help="--synthetic: random seed")
    p.add_argument("--out", help="output .npz")
    p.add_argument("--stats", action="store_true", help="print locality statistics of the trace")
    add_placement_arguments(p)                   # where experts live while recording (routing is unchanged)
    add_kernel_arguments(p)


def run(args) -> int:
    if args.out is None and not args.stats:
        raise HotExpertsError("nothing to do: give --out FILE.npz and/or --stats")
    trace = _make_trace(args)
    if args.out:
        path = trace.save(args.out)
        print(f"wrote {path}: {trace.num_tokens} tokens x {trace.num_layers} MoE layers x top-{trace.top_k} "
              f"({int(trace.is_prompt.sum())} prompt), source {trace.meta['source']}")
    if args.stats:
        print(format_table([summarize(trace)]))
    return 0


def _make_trace(args) -> RoutingTrace:
    if args.import_src:
        return import_trace(args.import_src)
    if args.synthetic:
        return generate(preset(args.synthetic), num_tokens=args.tokens, seed=args.seed)
    if not (args.prompts or args.chat):
        raise HotExpertsError("--model needs --prompts FILE or --chat FILE.jsonl")
    return _record_cli(args)


def _record_cli(args) -> RoutingTrace:
    # no CUDA graph: a replayed decode step would skip the on_route callback
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device,
                         placement=placement_from_args(args), use_cuda_graph=False,
                         kernel_options=kernel_options_from_args(args))
    prompts = read_prompts(args.chat or args.prompts, chat=bool(args.chat))
    ids = encode_prompts(engine.tokenizer, prompts, raw=args.raw)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    return record(engine, ids, params, meta=dict(model=str(args.model),
                                                   notes=[f"prompts: {args.chat or args.prompts}, greedy"]))
