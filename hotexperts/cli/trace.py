"""`hotexperts trace`: record, import or synthesize a routing trace (.npz, trace/format.py).

    hotexperts trace --model DIR|FILE.gguf|preset:NAME (--prompts FILE | --chat-file FILE.jsonl) [-n N]
                     --out F.npz                      live routing of greedy generation (trace/record.py)
    hotexperts trace --import SRC --out F.npz         SRC: shared-trace name, .route.csv, *_routing.jsonl, dir
    hotexperts trace --synthetic PRESET [--tokens N] [--seed S] --out F.npz
    add --stats to print the trace's locality statistics (decode tokens).
--prompts: one user message per non-empty line (chat template applied, as generate --chat; --raw to encode
as is). --chat-file: one JSON transcript per line ({"messages": [...]} or a bare list); the old spelling
`--chat FILE.jsonl` still works with a warning (flags.add_chat_arguments). A progress line per prompt goes
to stderr. The help the user sees is TRACE_DESCRIPTION, not this docstring.
"""

from __future__ import annotations

import sys
import time

from hotexperts.cli.flags import (
    SYNTHETIC_ROUTING,
    HelpFormatter,
    add_chat_arguments,
    add_device_argument,
    add_dtype_argument,
    add_kernel_arguments,
    add_max_tokens_argument,
    add_model_argument,
    add_placement_arguments,
    add_seed_argument,
    kernel_options_from_args,
    placement_from_args,
)
from hotexperts.engine.engine import Engine
from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import HotExpertsError
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.import_shared import import_trace
from hotexperts.trace.record import encode_prompts, read_prompts, record
from hotexperts.trace.stats import format_table, summarize
from hotexperts.trace.synthetic import generate, preset

TRACE_DESCRIPTION = f"""\
Make a routing trace (.npz: which experts every token used in every MoE layer) for simulate, auto and
bench --route-trace, in one of three ways:
  record      --model M --prompts FILE [--chat-file FILE.jsonl]   run the model greedily, record its routing
  import      --import SRC        a real trace: a shared-trace name, .route.csv, *_routing.jsonl or a folder
  synthesize  --synthetic PRESET  calibrated synthetic routing ({SYNTHETIC_ROUTING})
--stats prints the trace's locality statistics (decode tokens).

examples:
  hotexperts trace --model preset:tiny-qwen3-moe --prompts prompts.txt --out trace.npz
  hotexperts trace --synthetic qwen3-30b-a3b --tokens 4096 --out syn.npz --stats
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("trace", help="record, import or synthesize a routing trace (.npz)",
                              description=TRACE_DESCRIPTION, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    add_model_argument(p, required=False, group=src)
    src.add_argument("--import", dest="import_src", metavar="SRC",
                     help="convert a real trace: mixtral-8x7b | qwen3-30b-a3b | gemma-4-26b-a4b | "
                          "gpt-oss-120b (from ../shared/traces), or a .route.csv / *_routing.jsonl / "
                          "folder / .npz")
    src.add_argument("--synthetic", metavar="PRESET",
                     help=f"generate: {SYNTHETIC_ROUTING}")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", metavar="FILE", help="one user message per non-empty line")
    add_chat_arguments(p, prompts)
    p.add_argument("--raw", action="store_true", help="encode --prompts lines as they are, without the chat "
                                                      "template")
    add_max_tokens_argument(p, 128, "tokens generated per prompt (greedy)")
    add_dtype_argument(p)
    add_device_argument(p)
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="--synthetic: number of tokens (default: the preset's)")
    add_seed_argument(p, "--synthetic's routing (default: the preset's)", default=None)
    p.add_argument("--out", metavar="FILE.npz", help="output trace")
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
    if not (args.prompts or args.chat_file):
        raise HotExpertsError("--model needs --prompts FILE or --chat-file FILE.jsonl")
    if args.prompts and args.chat_file:
        raise HotExpertsError("--prompts and --chat-file (or the old --chat FILE) both given: choose one")
    if args.chat is True and args.raw:
        raise HotExpertsError("--chat (the chat template) and --raw (no template) contradict each other")
    return _record_cli(args)


def _record_cli(args) -> RoutingTrace:
    # no CUDA graph: a replayed decode step would skip the on_route callback
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device,
                         placement=placement_from_args(args), use_cuda_graph=False,
                         kernel_options=kernel_options_from_args(args))
    source = args.chat_file or args.prompts
    prompts = read_prompts(source, chat=bool(args.chat_file))
    ids = encode_prompts(engine.tokenizer, prompts, raw=args.raw)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    return record(engine, Progress(ids, "recording", "prompt"), params,
                  meta=dict(model=str(args.model), notes=[f"prompts: {source}, greedy"]))


class Progress:
    """Iterates `items`, printing 'trace: recording prompt i/N (t s)' on stderr before each one (a trace
    of many prompts takes minutes on a CPU: the user sees it move)."""

    def __init__(self, items, doing: str, unit: str, out=None):
        self.items, self.doing, self.unit, self.out = list(items), doing, unit, out

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        out = self.out or sys.stderr
        t0 = time.perf_counter()
        for i, item in enumerate(self.items, 1):
            print(f"trace: {self.doing} {self.unit} {i}/{len(self.items)} ({time.perf_counter() - t0:.0f} s)",
                  file=out, flush=True)
            yield item
