"""Benchmark workloads (llama-bench style) and routing sources, as plain data.

    parse_tests("pp512,pp4096,tg128,tg128@d4096") -> [BenchTest]
        ppN         prompt processing of N tokens, prompt tokens/s
        tgN         N generated tokens after a 1-token prompt, generation tokens/s (prompt time excluded)
        tgN@dD      N generated tokens at context depth D (a D-token prompt processed first, untimed)
    routing_source(kind, arg, cfg) -> RoutingSource     named in every report
        "router"               the model's own router (random weights: NOT a speed source; see docs)
        "trace" FILE           a recorded trace (.npz, or a raw file of ../shared/traces), replayed
        "synthetic" PRESET     the calibrated generator (trace/synthetic.py), shaped to the model
    parse_counts("4,2", "--parallel", "request", 16) -> [1, 2, 4]   a flag's comma list of counts in 1..upper,
                           sorted, 1 (the baseline) always added; None or "" -> []
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from hotexperts.errors import HotExpertsError
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.import_shared import import_trace
from hotexperts.trace.synthetic import generate, preset

TEST_RE = re.compile(r"^(pp|tg)(\d+)(?:@d(\d+))?$")


@dataclass(frozen=True)
class BenchTest:
    name: str
    kind: str        # "pp" | "tg"
    n: int
    depth: int = 0

    @property
    def context_needed(self) -> int:
        return self.n + self.depth + 1


def parse_tests(text: str) -> list[BenchTest]:
    tests = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        m = TEST_RE.match(item)
        if not m or int(m.group(2)) < 1:
            raise HotExpertsError(f"cannot read the test {item!r}: use ppN, tgN or tgN@dD (e.g. tg128@d4096)")
        tests.append(BenchTest(item, m.group(1), int(m.group(2)), int(m.group(3) or 0)))
    if not tests:
        raise HotExpertsError("no benchmark tests given")
    return tests


def parse_counts(text: str | None, flag: str, unit: str, upper: int) -> list[int]:
    """The counts of a bench flag such as --parallel or --verify-t: sorted, 1 added, each in 1..upper;
    unit names what is counted in the message for a non-number ("request": "request counts like 1,2,4,8")."""
    if not text:
        return []
    try:
        counts = sorted({int(n) for n in str(text).split(",") if n.strip()} | {1})
    except ValueError:
        raise HotExpertsError(f"{flag} takes {unit} counts like 1,2,4,8, got {text!r}") from None
    if counts[0] < 1 or counts[-1] > upper:
        raise HotExpertsError(f"{flag} values must be in [1, {upper}], got {text!r}")
    return counts


@dataclass
class RoutingSource:
    kind: str                   # router | trace | synthetic
    name: str                   # what the report prints
    trace: object | None = None  # RoutingTrace (None for the model's own router)

    @property
    def first_decode(self) -> int:
        """Index of the first generated token in the trace (tg runs start there)."""
        if self.trace is None:
            return 0
        gen = (~self.trace.is_prompt).nonzero()[0]
        return int(gen[0]) if len(gen) else 0


def routing_source(kind: str, arg: str | None, cfg, num_tokens: int = 8192, seed: int = 0) -> RoutingSource:
    if kind == "router":
        return RoutingSource("router", "the model's own router (random weights)")
    if kind == "trace":
        return _trace_source(arg, cfg)
    if kind == "synthetic":
        return _synthetic_source(arg or "qwen3-30b-a3b", cfg, num_tokens, seed)
    raise HotExpertsError(f"unknown routing source {kind!r}: router, trace or synthetic")


def _trace_source(path: str, cfg) -> RoutingSource:
    p = Path(path)
    trace = RoutingTrace.load(p) if p.suffix == ".npz" else import_trace(p)
    _check_shape(trace.num_experts, trace.num_layers, cfg, f"trace {p.name}")
    src = trace.meta.get("source", p.name)
    return RoutingSource("trace", f"replayed trace {p.name} ({trace.meta.get('model', '?')}, {src}, "
                                  f"top-{trace.top_k}, {trace.num_tokens} tokens)", trace)


def _synthetic_source(name: str, cfg, num_tokens: int, seed: int) -> RoutingSource:
    p = preset(name)
    p = replace(p, num_experts=cfg.num_experts, num_layers=len(cfg.moe_layers),
                top_k=min(cfg.top_k, cfg.num_experts), seed=seed)
    trace = generate(p, num_tokens=num_tokens)
    return RoutingSource("synthetic", f"synthetic routing, preset {name} (E={p.num_experts}, k={p.top_k}, "
                                      f"{trace.num_tokens} tokens, seed {seed})", trace)


def _check_shape(experts: int, layers: int, cfg, what: str) -> None:
    if experts > cfg.num_experts or layers != len(cfg.moe_layers):
        raise HotExpertsError(f"{what} has {layers} MoE layers x {experts} experts but the model has "
                              f"{len(cfg.moe_layers)} x {cfg.num_experts}: replay needs the same shape")
