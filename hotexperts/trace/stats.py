"""Locality statistics of a routing trace (numpy only, no torch).

All functions take a `RoutingTrace` and return per-layer arrays [Lm] (NaN where undefined) or scalars;
missing cells (id -1) are skipped. Definitions:

  reuse_distance_median   per selection of expert e at token t in layer l, t - (last token < t of the same
                          request that selected e in l); median over selections with an earlier use.
                          1 = the expert was also chosen by the previous token.
  repeat_share            share of a token's selections that the previous token (same request) also made;
                          uniform routing gives K/E.
  lru_hit_rate(f)         per-layer LRU cache of round(f*E) experts (at least 1), cold start, shared across
                          requests; per token all K lookups happen before the K updates (touch in slot
                          order). Hits / lookups.
  lru_hits(f)             the same cache's outcome per cell, [N, Lm, K] bool (what a prefetcher must cover).
  distinct_experts        number of experts selected at least once, per layer.
  top_share(q)            share of selections going to the q most-used fraction of experts (uniform: q).
  static_coverage(n)      top-n experts per layer counted on the first half of tokens; share of the
                          second half's selections they cover.

`summarize(trace, decode=True)` returns all of them (means over layers) as one flat dict; the published
measurements are quoted on decode tokens, hence the default.
"""

from __future__ import annotations

import numpy as np

from hotexperts.trace.format import RoutingTrace


def _valid(trace: RoutingTrace) -> np.ndarray:
    return trace.ids >= 0                                                 # [N, Lm, K]


def reuse_distances(trace: RoutingTrace) -> list[np.ndarray]:
    """Per layer, the token distance of every re-selection (see module docstring)."""
    n, lm, _ = trace.ids.shape
    last = np.full((lm, trace.num_experts + 1), -1, np.int64)            # column E absorbs id -1
    out: list[list[np.ndarray]] = [[] for _ in range(lm)]
    rows = np.arange(lm)[:, None]
    for t in range(n):
        if t and trace.request[t] != trace.request[t - 1]:
            last[:] = -1
        ids = trace.ids[t].astype(np.int64)                               # [Lm, K]
        ids = np.where(ids < 0, trace.num_experts, ids)
        prev = last[rows, ids]                                            # [Lm, K]
        ok = (prev >= 0) & (ids < trace.num_experts)
        for layer in np.flatnonzero(ok.any(axis=1)):
            out[layer].append(t - prev[layer][ok[layer]])
        last[rows, ids] = t
    return [np.concatenate(d) if d else np.zeros(0, np.int64) for d in out]


def reuse_distance_median(trace: RoutingTrace) -> np.ndarray:
    return np.array([np.median(d) if d.size else np.nan for d in reuse_distances(trace)])


def repeat_share(trace: RoutingTrace) -> np.ndarray:
    """[Lm] share of selections also made by the previous token of the same request."""
    cur, prev = trace.ids[1:], trace.ids[:-1]                             # [N-1, Lm, K]
    same_req = (trace.request[1:] == trace.request[:-1])[:, None]
    present = (cur[:, :, :1] >= 0) & (prev[:, :, :1] >= 0)                # both cells recorded
    rep = (cur[..., :, None] == prev[..., None, :]).any(-1) & (cur >= 0)  # [N-1, Lm, K]
    mask = (cur >= 0) & present & same_req[..., None]
    with np.errstate(invalid="ignore"):
        return (rep & mask).sum((0, 2)) / mask.sum((0, 2))


def lru_hit_rate(trace: RoutingTrace, fraction: float) -> np.ndarray:
    """[Lm] LRU hit rate with round(fraction * E) experts resident per layer (see module docstring)."""
    hits, valid = lru_hits(trace, fraction), trace.ids >= 0
    with np.errstate(invalid="ignore"):
        return hits.sum((0, 2)) / valid.sum((0, 2))


def lru_hits(trace: RoutingTrace, fraction: float) -> np.ndarray:
    """[N, Lm, K] bool: the cell hit the per-layer LRU of round(fraction * E) experts (lru_hit_rate's cache;
    missing cells are False)."""
    e, (n, lm, k) = trace.num_experts, trace.ids.shape
    cap = min(e, max(1, round(fraction * e)))
    last = np.full((lm, e + 1), -1, np.int64)                             # last-touch stamp; -1 never
    out = np.zeros((n, lm, k), bool)
    rows = np.arange(lm)[:, None]
    stamp = np.arange(k, dtype=np.int64)
    for t in range(n):
        ids = trace.ids[t].astype(np.int64)                               # [Lm, K]
        valid = ids >= 0
        ids = np.where(valid, ids, e)
        kth = np.partition(last[:, :e], e - cap, axis=1)[:, e - cap]      # [Lm] cap-th most recent stamp
        stamps = last[rows, ids]
        out[t] = valid & (stamps >= 0) & (stamps >= kth[:, None])
        last[rows, ids] = np.where(valid, t * k + stamp, -1)
    return out


def distinct_experts(trace: RoutingTrace) -> np.ndarray:
    return (_counts(trace) > 0).sum(1)


def _counts(trace: RoutingTrace) -> np.ndarray:
    """[Lm, E] selections per expert."""
    lm, e = trace.num_layers, trace.num_experts
    ids = trace.ids.astype(np.int64)
    layer = np.broadcast_to(np.arange(lm)[None, :, None], ids.shape)
    ok = ids >= 0
    return np.bincount(layer[ok] * e + ids[ok], minlength=lm * e).reshape(lm, e)


def top_share(trace: RoutingTrace, q: float = 0.1) -> np.ndarray:
    """[Lm] share of selections on the ceil(q*E) most popular experts."""
    counts = np.sort(_counts(trace), axis=1)[:, ::-1]
    top = max(1, int(np.ceil(q * trace.num_experts)))
    with np.errstate(invalid="ignore"):
        return counts[:, :top].sum(1) / counts.sum(1)


def static_coverage(trace: RoutingTrace, n: int) -> np.ndarray:
    """[Lm] coverage of the second half by the top-n experts of the first half."""
    half = trace.num_tokens // 2
    learn, test = trace.take(np.arange(half)), trace.take(np.arange(half, trace.num_tokens))
    top = np.argsort(-_counts(learn), axis=1, kind="stable")[:, :n]        # [Lm, n]
    counts = _counts(test)
    with np.errstate(invalid="ignore"):
        return np.take_along_axis(counts, top, 1).sum(1) / counts.sum(1)


def summarize(trace: RoutingTrace, decode: bool = True, fractions=(0.25, 0.4, 0.5),
              static_n: int | None = None) -> dict:
    """Flat dict of layer-mean statistics (see module docstring); `decode` keeps generated tokens only."""
    t = trace.decode_only() if decode and (~trace.is_prompt).any() else trace
    e, k = t.num_experts, t.top_k
    static_n = static_n or max(k, e // 16)
    out = dict(model=t.meta.get("model"), tokens=t.num_tokens, layers=t.num_layers, experts=e, top_k=k,
               reuse_median=_nanmean(reuse_distance_median(t)), repeat=_nanmean(repeat_share(t)),
               repeat_uniform=k / e)
    for f in fractions:
        out[f"lru@{f:g}"] = _nanmean(lru_hit_rate(t, f))
    out.update(distinct=float(distinct_experts(t).mean()), top10_share=_nanmean(top_share(t, 0.1)),
               static_n=static_n, static_cov=_nanmean(static_coverage(t, static_n)))
    return out


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def format_table(rows: list[dict], keys: list[str] | None = None) -> str:
    """A markdown table of `summarize` dicts (floats with 3 significant decimals)."""
    keys = keys or list(rows[0])
    fmt = [" | ".join(_cell(r.get(key)) for key in keys) for r in rows]
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + [f"| {f} |" for f in fmt])


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)
