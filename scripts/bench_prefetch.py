"""Decode with next-layer prefetch off and on (experts/predict.py), same engine settings: tok/s, hit rate,
fills issued, and whether the tokens are identical.

    python scripts/bench_prefetch.py --model preset:tiny-qwen3-moe --placement cache:6slots:lru --tokens 64
    python scripts/bench_prefetch.py --model DIR|GGUF --placement cache:8GiB --tokens 256 --extra 2   # GPU

Prefetch runs on the synchronous decode path (`--moe-decode sync`: one host round trip per layer), so both
runs use it; the worker's graphed decode step is the faster baseline and ignores prediction (the row
"worker" is printed for reference). On a CPU-only machine the "GPU" slots are emulated and copies are
synchronous: the numbers check the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import time

from hotexperts.engine.engine import Engine
from hotexperts.engine.sampling import SamplingParams
from hotexperts.experts.placement import Placement
from hotexperts.experts.predict import NextLayerPredictor

PROMPT = ("The cache keeps the experts that are used most often on the card, and the processor computes "
          "the rest.")


def run(args, decode: str, predict: bool) -> dict:
    placement = Placement.parse(args.placement, decode=decode)
    engine = Engine.load(args.model, dtype=args.dtype, placement=placement, max_context=1024)
    try:
        ex = engine.executor
        if predict:
            ex.enable_prediction(NextLayerPredictor.from_model(engine.model, args.extra),
                                 cold_steps=args.cold_steps, max_fills=args.max_fills)
        ids = engine.tokenizer.encode(PROMPT)
        list(engine.generate(ids, SamplingParams(max_tokens=8)))              # warm up
        t0 = time.perf_counter()
        toks = list(engine.generate(ids, SamplingParams(max_tokens=args.tokens)))
        dt = time.perf_counter() - t0
        st = engine.stats().get("cache") or {}
        tot = st.get("total", {})
        hits, misses = tot.get("hits", 0), tot.get("misses", 0)
        issued = ex.prefetch.issued if ex.prefetch is not None else 0
        return dict(tokens=toks, tok_s=len(toks) / dt, hit=hits / max(hits + misses, 1), issued=issued)
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preset:tiny-qwen3-moe")
    ap.add_argument("--placement", default="cache:6slots:lru")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--extra", type=int, default=2, help="guesses beyond top-k")
    ap.add_argument("--cold-steps", type=int, default=8)
    ap.add_argument("--max-fills", type=int, default=2)
    args = ap.parse_args()
    rows = {"worker": run(args, "auto", False), "sync": run(args, "sync", False),
            "sync+prefetch": run(args, "sync", True)}
    for name, r in rows.items():
        print(f"{name:14s} {r['tok_s']:8.2f} tok/s  hit {r['hit']:.3f}  prefetch fills {r['issued']}")
    for a, b in (("sync", "sync+prefetch"), ("worker", "sync")):
        print(f"tokens {a} vs {b}: {agreement(rows[a]['tokens'], rows[b]['tokens'])}")


def agreement(a: list[int], b: list[int]) -> str:
    """'identical' or where two greedy runs part. Runs whose hits and misses split differently add the same
    experts in another order and on other kernels (GPU slots vs CPU): exact on CPU in fp32 (the tests), a
    rounding difference in bf16 on a GPU, which a random model's near-ties can turn into another token."""
    if a == b:
        return f"identical ({len(a)} tokens)"
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"differ from token {first} of {len(a)} / {len(b)}"


if __name__ == "__main__":
    main()
