"""Held-out comparisons: the one warm-start rule every printed comparison of policies uses (numpy only).

    fit, test = split(trace, fit_fraction=0.5)       time split at a decode token (test starts a pass)
    cut = split_row(trace, fit_fraction=0.5)         the first row of `test` (rows >= cut)
    warm = warm_profile(fit, slots=K | budget=B)     the shared warm state built from the tuning part
    rows = compare(trace, policies, slots=K | budget=B, fit_fraction=0.5, **simulate_kw) -> [SimResult]
           (vs_belady filled in when belady is among the policies)
    rows = compare(trace, policies, slots=K, prefetch=Prefetch(predicted [N, Lm, P]))
           the same with next-layer prefetch: predicted covers the whole trace, the test part's rows replay
    rows = sweep(trace, policies, slots=[8, 16] | budgets=[600], progress=None, ...) -> [SimResult]
           compare at every capacity, in order (`hotexperts simulate`'s table)

Built on trace/simulate.py (the replay); simulate.py never imports this module (import-linter checks it).

The rule (docs/simulator.md, "Fair comparisons"): the decode tokens are split in time; the tuning part
(`fit`) is never scored. Every policy, Belady included, replays the `test` part from the SAME warm state:

- residency: the static hot set of the tuning part at that capacity (top decode counts per layer, or the
  top `budget` (layer, expert) pairs of per-layer routing rates; ties: layer, then expert id), loaded before
  the first test token; slots the tuning part cannot fill stay free;
- statistics: each policy seeded from that same profile (`policy.seed`; LRU and Belady keep none);
  `static` is the tuning part's hot set (held out, no longer in-sample);
- hits: counted over every decode selection of the test part, from its first token.

The profile's counts are per-layer routing rates (share of a layer's selections × top-k), the quantity
Decay/auto seed from, so a seeded policy ranks the warm residents exactly as the hot set does: nothing it
has not seen routed in the test part outranks a resident, i.e. no policy gets a prefetch the on-demand ones
(LRU, Belady) do not. Belady (MIN with bypass and demand fetch) from the same residency is then the upper
bound of the comparison; tests/trace/test_heldout.py checks that no online policy exceeds it.
"""

from __future__ import annotations

import numpy as np

from hotexperts.errors import HotExpertsError
from hotexperts.experts.profile import Profile, profile_from_counts
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.simulate import (
    ALL_POLICIES,
    Prefetch,
    SimResult,
    fill_belady,
    simulate,
    trace_profile,
)

FIT_FRACTION = 0.5


def split_row(trace: RoutingTrace, fit_fraction: float = FIT_FRACTION) -> int:
    """The first row of the held-out part: at a decode token, on a pass boundary."""
    decode = np.flatnonzero(~trace.is_prompt)
    if decode.size < 4:
        raise HotExpertsError("a held-out comparison needs a trace with at least a few generated tokens")
    cut = int(decode[min(int(decode.size * fit_fraction), decode.size - 1)])
    it = trace.iterations()
    return int(np.flatnonzero(it == it[cut])[0])          # the first row of the pass holding the cut


def split(trace: RoutingTrace, fit_fraction: float = FIT_FRACTION) -> tuple[RoutingTrace, RoutingTrace]:
    """Time split at a decode token: (fit, test); test starts at a pass boundary (split_row)."""
    cut, rows = split_row(trace, fit_fraction), np.arange(trace.num_tokens)
    return trace.take(rows < cut), trace.take(rows >= cut)


def warm_profile(fit: RoutingTrace, *, slots: int | None = None, budget: int | None = None) -> Profile:
    """The shared warm state: per-layer routing rates of the tuning part's decode tokens and the hot set
    for the capacity (profile_from_counts over those rates)."""
    counts = trace_profile(fit).counts
    rates = {}
    for l, c in counts.items():
        c = np.asarray(c, np.float64)
        rates[l] = (c / max(c.sum(), 1e-9) * fit.top_k).tolist()
    prof = profile_from_counts(rates, capacity=slots, budget=budget)
    prof.meta = {"model": fit.meta.get("model"), "source": "tuning part (held-out comparison)",
                 "top_k": fit.top_k}
    return prof


def compare(trace: RoutingTrace, policies, *, slots: int | None = None, budget: int | None = None,
            fit_fraction: float = FIT_FRACTION, params: dict | None = None, prefetch: Prefetch | None = None,
            **kw) -> list[SimResult]:
    """Every policy on the test part from the shared warm state (module doc); params: name -> kwargs;
    prefetch: its predictions over the whole trace (the test part's rows are replayed)."""
    fit, test = split(trace, fit_fraction)
    warm = warm_profile(fit, slots=slots, budget=budget)
    if prefetch is not None:
        prefetch = prefetch.rows(slice(fit.num_tokens, None))
    rows = [simulate(test, p, slots=slots, budget=budget, warm_start=warm, prefetch=prefetch,
                     **kw, **{"profile": warm, **(params or {}).get(p, {})}) for p in policies]
    fill_belady(rows)
    return rows


def sweep(trace: RoutingTrace, policies=ALL_POLICIES, *, slots=(), budgets=(),
          fit_fraction: float = FIT_FRACTION, params: dict | None = None, progress=None,
          **kw) -> list[SimResult]:
    """`compare` at every capacity: each of `slots` (per layer), then each of `budgets` (global slots).
    params: policy name -> extra constructor kwargs (e.g. auto's pay-back costs). progress(done, total,
    what): called after each capacity (the CLI prints a line: long traces take minutes)."""
    out = []
    caps = [("slots", s) for s in slots] + [("budget", b) for b in budgets]
    for i, (kind, cap) in enumerate(caps, 1):
        out += compare(trace, policies, **{kind: cap}, fit_fraction=fit_fraction, params=params, **kw)
        if progress is not None:
            progress(i, len(caps), f"{cap} {'slots per layer' if kind == 'slots' else 'slots in all'}")
    return out
