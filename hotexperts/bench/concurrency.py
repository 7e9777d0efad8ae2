"""The concurrency test (`hotexperts bench --parallel 1,2,4,8`): decode throughput with N requests batched
into one step (continuous batching, engine/batch.py), per placement.

    parse_parallel("1,2,4,8") -> [1, 2, 4, 8]            (1 is always added; each in 1..MAX_SLOTS)
    context_needed(ns, steps, depth, repeats) -> positions one slot needs
    concurrency(engine, tokens, ns, steps=16, repeats=3, depth=64, sync=...) -> {
        "depth": 64, "steps": 16, "repeats": 3,
        "one_request_tok_per_s": ...,             the one-request decode path (-np 1: its CUDA graph)
        "rows": [{"N": N, "step_ms": ..., "aggregate_tok_per_s": N steps / t, "per_request_tok_per_s":
                  steps / t, "vs_one_request": aggregate / one_request_tok_per_s}, ...]}
    table(results) -> str                                 (one block per placement)

The engine must have max(ns) sequence slots (Engine(parallel=...)). For each N, N requests with prompts of
`depth` tokens (different slices of the bench tokens) are admitted (prefill untimed), two untimed steps run,
then `repeats` rounds of `steps` batched steps are timed (the median round); every request ignores EOS, so
all N rows stay in every step. Tokens are the model's greedy choices; the routing is the bench's (a replayed
trace gives each step the next N rows: the union of N tokens' experts). The one-request baseline times
`steps` T=1 decode steps of the engine's own decode path after a `depth`-token prompt, as the tg test does.
The issue's target reads aggregate at N = 4 >= 2.5 x the one-request speed.
"""

from __future__ import annotations

import time

import torch

from hotexperts.bench.workload import parse_counts
from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import HotExpertsError
from hotexperts.models.cache import MAX_SLOTS


def parse_parallel(text: str | None) -> list[int]:
    return parse_counts(text, "--parallel", "request", MAX_SLOTS)


def context_needed(ns: list[int], steps: int = 16, depth: int = 64, repeats: int = 3) -> int:
    return depth + 4 + (repeats + 1) * steps


def _one_request(engine, tokens: list[int], steps: int, depth: int, repeats: int, sync) -> float:
    """tok/s of the one-request decode path (the median of `repeats` rounds after one untimed round)."""
    runs = []
    with torch.no_grad():
        for r in range(repeats + 1):
            token = int(engine.prefill(tokens[:depth]).argmax())
            sync()
            t0 = time.perf_counter()
            for i in range(steps):
                token = int(engine.decode_one(token, depth + i).argmax())
            sync()
            if r:
                runs.append(steps / (time.perf_counter() - t0))
    return sorted(runs)[len(runs) // 2]


def _batched(batch, tokens: list[int], n: int, steps: int, depth: int, repeats: int, sync) -> float:
    """Seconds per batched step of n requests (the median round)."""
    params = SamplingParams(max_tokens=(repeats + 1) * steps + 4)
    seqs = [batch.add(tokens[i * 7:i * 7 + depth], params, ignore_eos=True) for i in range(n)]
    try:
        for _ in range(2):
            batch.step()
        runs = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                batch.step()
            sync()
            runs.append((time.perf_counter() - t0) / steps)
        return sorted(runs)[len(runs) // 2]
    finally:
        for seq in seqs:
            batch.release(seq)


def concurrency(engine, tokens: list[int], ns: list[int], *, steps: int = 16, repeats: int = 3,
                depth: int = 64, sync=lambda: None) -> dict:
    batch = engine.batch
    if batch is None or batch.num_slots < max(ns):
        raise HotExpertsError(f"the concurrency test needs an engine with {max(ns)} slots (parallel=...)")
    if len(tokens) < 7 * max(ns) + depth:
        raise HotExpertsError("the concurrency test needs more bench tokens than it was given")
    one = _one_request(engine, tokens, steps, depth, repeats, sync)
    rows = []
    for n in ns:
        t = _batched(batch, tokens, n, steps, depth, repeats, sync)
        rows.append({"N": n, "step_ms": 1e3 * t, "aggregate_tok_per_s": n / t, "per_request_tok_per_s": 1 / t,
                     "vs_one_request": (n / t) / one if one else 0.0})
    engine.executor.flush()
    return {"depth": depth, "steps": steps, "repeats": repeats, "one_request_tok_per_s": one, "rows": rows}


def table(results: list[dict]) -> str:
    """One block per placement: per N the step time, aggregate and per-request tok/s, aggregate vs the
    one-request path."""
    out = ["concurrency (N requests batched into one decode step; aggregate = N tokens per step)"]
    for res in results:
        c = res.get("concurrency")
        if not c:
            continue
        out.append(f"\n{res['label']}  (prompt depth {c['depth']}, {c['steps']} steps x {c['repeats']}; "
                   f"one-request decode path {c['one_request_tok_per_s']:.1f} tok/s)")
        out.append(f"{'N':>3} {'ms/step':>9} {'aggregate tok/s':>16} {'per-request tok/s':>18} "
                   f"{'x one-request':>13}")
        for r in c["rows"]:
            out.append(f"{r['N']:>3} {r['step_ms']:>9.2f} {r['aggregate_tok_per_s']:>16.1f} "
                       f"{r['per_request_tok_per_s']:>18.1f} {r['vs_one_request']:>13.2f}")
    return "\n".join(out)
