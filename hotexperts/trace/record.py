"""Record routing from live generation, and the `hotexperts trace` subcommand.

RouteRecorder is the executor's `on_route(layer, ids [T,K], weights [T,K])` callback: each call copies the
layer's choices to the host once (ids and weights packed into one float32 tensor) and writes them into
preallocated numpy buffers [capacity, Lm, K] that grow by doubling. A new forward pass starts when a call's
MoE layer is not after the previous call's (or after `end_step()`); its T tokens take the next T rows.
Recording is off by default: the executor's `on_route` is None except inside `record()`.
The caller says what the tokens are: `begin_request()` (new request, prompt tokens follow) and
`mark_prompt(False)` once generation starts. `to_trace(meta)` returns a `RoutingTrace`.

CLI (add_parser / run, the project's subcommand convention):
    hotexperts trace --model DIR|preset:NAME (--prompts FILE | --chat FILE.jsonl) [--max-tokens N] --out F.npz
    hotexperts trace --import SRC --out F.npz   SRC: shared-trace name, .route.csv, *_routing.jsonl, dir
    hotexperts trace --synthetic PRESET [--tokens N] [--seed S] --out F.npz
    add --stats to print the trace's locality statistics (decode tokens).
--prompts: one user message per non-empty line (chat template applied; --raw to encode as is).
--chat: one JSON transcript per line ({"messages": [...]} or a bare list); the prompt is the transcript up
to and including its last user message.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hotexperts.errors import HotExpertsError
from hotexperts.trace.format import RoutingTrace


class RouteRecorder:
    def __init__(self, moe_layers: Sequence[int], top_k: int, capacity: int = 4096):
        self.moe_layers = [int(x) for x in moe_layers]
        self.top_k = int(top_k)
        self._col = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._alloc(max(1, capacity))
        self._n = 0                      # tokens recorded
        self._base = 0                   # first row of the open forward pass
        self._t = 0                      # tokens in the open forward pass
        self._last_col = None            # column of the previous call; None = no open forward
        self._step = -1
        self._request = -1
        self._prompt = True

    def _alloc(self, cap: int) -> None:
        lm, k = len(self.moe_layers), self.top_k
        self._ids = np.full((cap, lm, k), -1, np.int16)                    # [cap, Lm, K]
        self._w = np.full((cap, lm, k), np.nan, np.float16)
        self._is_prompt = np.zeros(cap, bool)
        self._req = np.zeros(cap, np.int32)
        self._steps = np.zeros(cap, np.int32)

    def _grow(self, need: int) -> None:
        cap = len(self._is_prompt)
        if need <= cap:
            return
        old = (self._ids, self._w, self._is_prompt, self._req, self._steps)
        self._alloc(max(need, 2 * cap))
        for dst, src in zip((self._ids, self._w, self._is_prompt, self._req, self._steps), old, strict=True):
            dst[:cap] = src

    # ---- what the tokens are ------------------------------------------------------------------
    def begin_request(self, prompt: bool = True) -> None:
        self._request += 1
        self._prompt = prompt
        self.end_step()

    def mark_prompt(self, prompt: bool) -> None:
        self._prompt = bool(prompt)

    def end_step(self) -> None:
        """Close the open forward pass (optional: a call for an earlier layer also starts a new one)."""
        self._last_col = None

    @property
    def num_tokens(self) -> int:
        return self._n

    # ---- the on_route callback ----------------------------------------------------------------
    def __call__(self, layer: int, ids, weights) -> None:
        col = self._col.get(int(layer))
        if col is None:
            raise HotExpertsError(f"on_route: layer {layer} is not a MoE layer {self.moe_layers}")
        host = _to_host(ids, weights)                                       # [T, 2K] float32
        t, k = host.shape[0], host.shape[1] // 2
        if k != self.top_k:
            raise HotExpertsError(f"on_route: got {k} experts per token, recorder expects {self.top_k}")
        if self._last_col is None or col <= self._last_col or t != self._t:
            self._open_forward(t)
        self._last_col = col
        rows = slice(self._base, self._base + t)
        self._ids[rows, col] = host[:, :k]
        self._w[rows, col] = host[:, k:]

    def _open_forward(self, t: int) -> None:
        if self._request < 0:
            self.begin_request(self._prompt)
        self._base, self._t, self._step = self._n, t, self._step + 1
        self._grow(self._n + t)
        rows = slice(self._n, self._n + t)
        self._is_prompt[rows], self._req[rows], self._steps[rows] = self._prompt, self._request, self._step
        self._n += t

    def to_trace(self, meta: dict) -> RoutingTrace:
        """meta must give num_experts (model, source default to "unknown", "recorded")."""
        full = dict(model="unknown", source="recorded", top_k=self.top_k, moe_layers=self.moe_layers)
        full.update(meta)
        n = self._n
        return RoutingTrace(self._ids[:n].copy(), self._w[:n].copy(), self._is_prompt[:n].copy(),
                            self._req[:n].copy(), full, self._steps[:n].copy())


def _to_host(ids, weights) -> np.ndarray:
    """ids [T,K], weights [T,K] (torch or numpy) -> [T, 2K] float32 numpy with one device->host copy."""
    if hasattr(ids, "detach"):
        import torch

        packed = torch.cat([ids.detach().to(torch.float32), weights.detach().to(torch.float32)], dim=1)
        return packed.cpu().numpy()
    return np.concatenate([np.asarray(ids, np.float32), np.asarray(weights, np.float32)], axis=1)


# ---- live recording -----------------------------------------------------------------------------

def attach(engine, recorder: RouteRecorder) -> None:
    """Set the engine's executor `on_route` to the recorder (needs `engine.executor`)."""
    executor = getattr(engine, "executor", None)
    if executor is None:
        raise HotExpertsError("this engine does not expose its executor (engine.executor): "
                              "cannot record routing")
    executor.on_route = recorder


def record(engine, prompts: list[list[int]], params, meta: dict | None = None) -> RoutingTrace:
    """Generate every prompt with `engine` and return the routing of prompt and generated tokens."""
    cfg = engine.config
    recorder = RouteRecorder(cfg.moe_layers, cfg.top_k)
    attach(engine, recorder)
    try:
        for ids in prompts:
            recorder.begin_request(prompt=True)
            for i, _ in enumerate(engine.generate(ids, params)):
                if i == 0:
                    recorder.mark_prompt(False)        # forwards after the first token are decode steps
    finally:
        engine.executor.on_route = None
    base = dict(model=cfg.model_type, model_type=cfg.model_type, num_experts=cfg.num_experts,
                source="recorded:hotexperts")
    return recorder.to_trace({**base, **(meta or {})})


def read_prompts(path: str | Path, chat: bool) -> list:
    """--prompts: list[str] (one per non-empty line); --chat: list[list[message]]."""
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise HotExpertsError(f"cannot read {path}: {e}") from None
    if not chat:
        return lines
    out = []
    for i, ln in enumerate(lines, 1):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise HotExpertsError(f"{path}:{i}: not JSON: {e}") from None
        msgs = obj.get("messages") if isinstance(obj, dict) else obj
        users = [j for j, m in enumerate(msgs or []) if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise HotExpertsError(f"{path}:{i}: a transcript needs a list of messages with a user turn")
        out.append(msgs[: users[-1] + 1])
    return out


def encode_prompts(tokenizer, prompts: list, raw: bool) -> list[list[int]]:
    out = []
    for p in prompts:
        if raw and isinstance(p, str):
            out.append(list(tokenizer.encode(p)))
            continue
        msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
        ids = tokenizer.apply_chat_template(msgs)
        out.append(list(tokenizer.encode(ids)) if isinstance(ids, str) else [int(x) for x in ids])
    return out


# ---- CLI ----------------------------------------------------------------------------------------

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
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--tokens", type=int, default=None, help="--synthetic: number of tokens")
    p.add_argument("--seed", type=int, default=None, help="--synthetic: random seed")
    p.add_argument("--out", help="output .npz")
    p.add_argument("--stats", action="store_true", help="print locality statistics of the trace")
    from hotexperts.experts.placement import add_placement_arguments

    add_placement_arguments(p)                   # where experts live while recording (routing is unchanged)


def run(args) -> int:
    if args.out is None and not args.stats:
        raise HotExpertsError("nothing to do: give --out FILE.npz and/or --stats")
    trace = _make_trace(args)
    if args.out:
        path = trace.save(args.out)
        print(f"wrote {path}: {trace.num_tokens} tokens x {trace.num_layers} MoE layers x top-{trace.top_k} "
              f"({int(trace.is_prompt.sum())} prompt), source {trace.meta['source']}")
    if args.stats:
        from hotexperts.trace.stats import format_table, summarize

        print(format_table([summarize(trace)]))
    return 0


def _make_trace(args) -> RoutingTrace:
    if args.import_src:
        from hotexperts.trace.import_shared import import_trace

        return import_trace(args.import_src)
    if args.synthetic:
        from hotexperts.trace.synthetic import generate, preset

        return generate(preset(args.synthetic), num_tokens=args.tokens, seed=args.seed)
    if not (args.prompts or args.chat):
        raise HotExpertsError("--model needs --prompts FILE or --chat FILE.jsonl")
    return _record_cli(args)


def _record_cli(args) -> RoutingTrace:
    from hotexperts.engine.engine import Engine
    from hotexperts.engine.sampling import SamplingParams
    from hotexperts.experts.placement import placement_from_args

    # no CUDA graph: a replayed decode step would skip the on_route callback
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device,
                         placement=placement_from_args(args), use_cuda_graph=False)
    prompts = read_prompts(args.chat or args.prompts, chat=bool(args.chat))
    ids = encode_prompts(engine.tokenizer, prompts, raw=args.raw)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    return record(engine, ids, params, meta=dict(model=str(args.model),
                                                   notes=[f"prompts: {args.chat or args.prompts}, greedy"]))
