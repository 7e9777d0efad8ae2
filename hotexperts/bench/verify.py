"""The verify-step cost test (`hotexperts bench --verify-t 1,2,4,8`): what one T-token verify step costs
against T=1 decode steps, per placement, and so the decode speed as a function of the tokens per step.

    parse_verify_ts("1,2,4,8") -> [1, 2, 4, 8]          (1, the baseline, is always added)
    verify_cost(engine, tokens, ts, steps=4, repeats=3, depth=64, sync=...) -> {
        "depth": 64, "steps": 4,
        "rows": [{"T": T, "ms_per_step": ..., "cost_vs_1": t(T)/t(1), "cost_vs_T_singles": t(T)/(T t(1)),
                  "breakeven_tokens_per_step": t(T)/t(1), "distinct_experts_per_layer": ...,
                  "speedup_at": {"1.0": ..., "1.5": ..., ..., str(T): ...}}, ...]}
    table(results) -> str                                (one block per placement)

A step of T tokens produces 1..T tokens (the accepted draft tokens and the one after them: the "accepted
tokens per step" of the issue's targets counts that one too); at a tokens per step the speed is a / t(T)
tokens/s, so speedup_at[a] = a t(1) / t(T). Random weights give no real acceptance rate: the table reports
speed as this function of a, for a from 1 to T in steps of 0.5. Each timed step runs at fresh positions
after a `depth`-token prompt (T=1: `steps` decode steps; T > 1: `steps` verify steps of T bench tokens), with
the bench's routing (a replayed trace gives each verify step the next T tokens' rows: the real union of
consecutive tokens' experts). The distinct experts per MoE layer come from the verify step's own counter
(engine/runner/verify.ExpertUnion; T=1: top_k, except -1 cells).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hotexperts.bench.workload import parse_counts
from hotexperts.engine.runner.verify import MAX_VERIFY_T


def parse_verify_ts(text: str | None) -> list[int]:
    return parse_counts(text, "--verify-t", "token", MAX_VERIFY_T)


def context_needed(ts: list[int], steps: int = 4, depth: int = 64, repeats: int = 3) -> int:
    return depth + 1 + (repeats + 1) * steps * max(ts, default=1)


def _time_steps(engine, tokens: list[int], T: int, pos: int, steps: int, sync) -> float:
    """Seconds per step of `steps` T-token steps from position pos."""
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        p = pos + i * T
        if T == 1:
            engine.decode_one(tokens[p], p)
        else:
            engine.verify(tokens[p:p + T], p)
    sync()
    return (time.perf_counter() - t0) / steps


def _speedups(T: int, t1: float, tT: float) -> dict:
    points = [1 + 0.5 * i for i in range(2 * T - 1)]                       # 1, 1.5, ..., T
    return {f"{a:g}": a * t1 / tT for a in points}


def trace_union(ids: np.ndarray, T: int) -> float:
    """Mean distinct experts per MoE layer over windows of T consecutive tokens of a routing trace
    (ids [N, Lm, K], -1 = missing): what a replayed verify step of T tokens routes to."""
    N, Lm, K = ids.shape
    W = N // T
    if W == 0:
        return 0.0
    win = np.sort(ids[:W * T].reshape(W, T, Lm, K).transpose(0, 2, 1, 3).reshape(W, Lm, T * K), axis=-1)
    new = np.concatenate([np.ones_like(win[..., :1], bool), win[..., 1:] != win[..., :-1]], axis=-1)
    return float((new & (win >= 0)).sum(-1).mean())


def verify_cost(engine, tokens: list[int], ts: list[int], *, steps: int = 4, repeats: int = 3,
                depth: int = 64, sync=lambda: None, trace_ids: np.ndarray | None = None) -> dict:
    """The test above on one engine. The first round per T is a warm-up (captures the T bucket's graph).
    trace_ids: the replayed routing's ids [N, Lm, K] (the executor sees those, not the model's router:
    the distinct experts then come from trace_union)."""
    union = engine.generator.verify_step.union
    times, distinct = {}, {}
    with torch.no_grad():
        for T in ts:
            engine.prefill(tokens[:depth])
            pos, runs = depth, []
            before = (int(union.total), union.calls)
            for r in range(repeats + 1):
                t = _time_steps(engine, tokens, T, pos, steps, sync)
                pos += steps * T
                if r:
                    runs.append(t)
            times[T] = sorted(runs)[len(runs) // 2]                          # the median
            calls = union.calls - before[1]
            distinct[T] = (int(union.total) - before[0]) / calls if calls else float(engine.config.top_k)
            if trace_ids is not None:
                distinct[T] = trace_union(trace_ids, T)
            engine.executor.flush()
    t1 = times[1]
    rows = [{"T": T, "ms_per_step": 1e3 * times[T], "cost_vs_1": times[T] / t1,
             "cost_vs_T_singles": times[T] / (T * t1), "breakeven_tokens_per_step": times[T] / t1,
             "distinct_experts_per_layer": distinct[T], "speedup_at": _speedups(T, t1, times[T])}
            for T in ts]
    return {"depth": depth, "steps": steps, "repeats": repeats, "rows": rows}


SHOWN = (1, 1.5, 2, 2.5, 3, 4, 8, 16)         # tokens-per-step values the table prints (the JSON has all)


def table(results: list[dict]) -> str:
    """One block per placement: ms per step, cost vs a 1-token step, distinct experts, and the speedup at
    a few tokens-per-step values."""
    out = ["verify-step cost (a T-token step vs 1-token steps); speedup at a tokens/step = a t(1) / t(T)"]
    for res in results:
        v = res.get("verify")
        if not v:
            continue
        out.append(f"\n{res['label']}  (prompt depth {v['depth']}, {v['steps']} steps x {v['repeats']})")
        out.append(f"{'T':>3} {'ms/step':>9} {'x 1-tok':>8} {'x T singles':>11} {'experts/layer':>13}  "
                   f"speedup at tokens/step")
        for r in v["rows"]:
            sp = " ".join(f"{a}:{s:.2f}" for a, s in r["speedup_at"].items() if float(a) in SHOWN)
            out.append(f"{r['T']:>3} {r['ms_per_step']:>9.2f} {r['cost_vs_1']:>8.2f} "
                       f"{r['cost_vs_T_singles']:>11.2f} {r['distinct_experts_per_layer']:>13.1f}  {sp}")
    return "\n".join(out)
