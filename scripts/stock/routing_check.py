"""Does a (random-weight) GGUF route diversely? Distinct experts per MoE layer in one 512-token ubatch.

    python3 scripts/stock/routing_check.py prompt --out PROMPT.txt [--words 200] [--seed 0]
    python3 -m hotexperts trace --model FILE.gguf --prompts PROMPT.txt --raw --max-tokens 1 --out R.npz
    python3 scripts/stock/routing_check.py stats R.npz [--tokens 512] [--json OUT.json]

`prompt` writes one line of seeded random lowercase words (llama-bench's pp512 feeds random token ids; a
line of random words is the closest a text prompt gets: hundreds of distinct tokens, no repeats).
`stats` takes the first --tokens prompt tokens of the trace's first request (one ubatch of llama-bench's
default size 512) and prints distinct experts per MoE layer: min / median / max over the layers, and the
largest share of that ubatch's selections that one expert of one layer took. This is OUR implementation's
router over the same weights (llama.cpp's own router is not instrumented). Collapsed routing (a few
experts take most tokens) makes prompt speed look better than it is on real weights (docs/benchmarks.md).
Imports: hotexperts.trace.format.RoutingTrace, hotexperts.trace.stats.distinct_experts.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from pathlib import Path

import numpy as np


def random_words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(n))


def ubatch_stats(ids: np.ndarray, num_experts: int) -> dict:
    """ids [T, Lm, K] (-1 = none) -> distinct experts per layer and the largest one-expert share."""
    t, lm, k = ids.shape
    distinct, top = [], []
    for layer in range(lm):
        sel = ids[:, layer].reshape(-1)
        sel = sel[sel >= 0]
        counts = np.bincount(sel, minlength=num_experts)
        distinct.append(int((counts > 0).sum()))
        top.append(float(counts.max() / max(1, sel.size)))
    d = np.array(distinct)
    return dict(tokens=t, layers=lm, top_k=k, experts=num_experts, distinct_min=int(d.min()),
                distinct_median=float(np.median(d)), distinct_max=int(d.max()), max_expert_share=max(top),
                distinct_per_layer=distinct)


def stats(path: str, tokens: int) -> dict:
    from hotexperts.trace.format import RoutingTrace
    from hotexperts.trace.stats import distinct_experts

    tr = RoutingTrace.load(path)
    first = np.flatnonzero(tr.is_prompt & (tr.request == tr.request[0]))
    if first.size < tokens:
        raise SystemExit(f"{path}: the first prompt has {first.size} tokens, fewer than {tokens}")
    ub = tr.take(first[:tokens])
    out = ubatch_stats(np.asarray(ub.ids), ub.num_experts)
    assert out["distinct_per_layer"] == [int(v) for v in distinct_experts(ub)]    # the package's own count
    out.update(source=str(path), model=tr.meta.get("model"),
               router="hotexperts' implementation of the model's router (llama.cpp's is not instrumented)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompt")
    p.add_argument("--out", required=True)
    p.add_argument("--words", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("stats")
    s.add_argument("trace")
    s.add_argument("--tokens", type=int, default=512)
    s.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "prompt":
        Path(a.out).write_text(random_words(a.words, a.seed) + "\n")
        return 0
    out = stats(a.trace, a.tokens)
    print(f"routing of one {out['tokens']}-token ubatch ({out['router']}): distinct experts per MoE layer "
          f"min {out['distinct_min']} / median {out['distinct_median']:g} / max {out['distinct_max']} of "
          f"{out['experts']} over {out['layers']} layers (top-{out['top_k']}); largest one-expert share "
          f"{out['max_expert_share']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
