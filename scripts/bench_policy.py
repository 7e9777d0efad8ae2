"""Host-side cost of the cache bookkeeping per decode step (CacheController + policy; numpy, no GPU).

A synthetic Qwen3-30B-A3B trace (48 MoE layers, 128 experts, top-8; 400 decode tokens) is replayed the way
the live engine drives the controller. Per step: hit flags from `lookup` (not timed: the GPU side knows
them), then the timed parts:
    observe   loop: `ctl.observe(...)` for each of the 48 layers;  step: one `ctl.observe_step(...)`
    end_step  `ctl.end_step(step)` + `ctl.commit(swaps)`
Cases: window-lfu with 95 slots per layer; auto with a global budget of 4500 slots and
cpu_seconds_per_expert = copy_seconds_per_expert = 7e-5. Prints mean ms per step (the first 20 steps are
warm-up, not counted; CPU time of this thread, so other load on the machine matters less) and checks that
both modes end with the same stats and swaps.

    python scripts/bench_policy.py                 # both modes (step mode only where observe_step exists)
    python scripts/bench_policy.py --tokens 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hotexperts.experts.policy import CacheController, make_policy
from hotexperts.trace import synthetic as syn

CASES = {
    "window-lfu hot:95": (dict(), dict(capacity=95)),
    "auto cache:4500": (dict(cpu_seconds_per_expert=7e-5, copy_seconds_per_expert=7e-5),
                        dict(capacity=None, budget=4500)),
}


def run(ids, layers, E, name, params, caps, mode, warmup=20):
    pol = make_policy(name.split()[0], **params)
    ctl = CacheController(pol, layers, E, caps["capacity"], 4, budget=caps.get("budget"))
    t_obs = t_end = 0.0
    swaps_all = []
    for t in range(ids.shape[0]):
        x = ids[t]                                                     # [Lm, K]
        hits = [ctl.lookup(l, x[j]) for j, l in enumerate(layers)]
        t0 = time.thread_time()
        if mode == "step":
            ctl.observe_step(t, layers, x, np.array(hits, bool))
        else:
            for j, l in enumerate(layers):
                ctl.observe(t, l, x[j], False, tokens=1, hits=hits[j])
        t1 = time.thread_time()
        swaps = ctl.end_step(t)
        ctl.commit(swaps)
        t2 = time.thread_time()
        swaps_all.append(swaps)
        if t >= warmup:
            t_obs, t_end = t_obs + t1 - t0, t_end + t2 - t1
    n = ids.shape[0] - warmup
    return 1e3 * t_obs / n, 1e3 * t_end / n, (ctl.stats, swaps_all)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs")
    args = ap.parse_args(argv)
    tr = syn.generate(syn.preset("qwen3-30b-a3b"), num_tokens=args.tokens, seed=0)
    ids, layers = np.asarray(tr.ids), list(tr.moe_layers)                  # [N, Lm, K] int16
    modes = ["loop"] + (["step"] if hasattr(CacheController, "observe_step") else [])
    print(f"{'case':<20} {'mode':<5} {'observe ms':>10} {'end_step ms':>11}")
    for case, (params, caps) in CASES.items():
        results = {}
        for mode in modes:
            best = None
            for _ in range(args.repeat):
                r = run(ids, layers, tr.num_experts, case, params, caps, mode)
                best = r if best is None else (min(best[0], r[0]), min(best[1], r[1]), r[2])
            results[mode] = best
            print(f"{case:<20} {mode:<5} {best[0]:10.3f} {best[1]:11.3f}")
        if "step" in results and results["step"][2] != results["loop"][2]:
            raise SystemExit(f"{case}: observe_step and the per-layer loop disagree")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
