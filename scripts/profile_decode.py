"""Where a decode token's GPU time goes (issue 16, all-GPU decode): one Engine over a GGUF or preset, a
prompt prefilled, the graphed T=1 step timed (tok/s, as `hotexperts bench` tg), then eager steps under
torch.profiler: kernels per token, CUDA time per token, the kernels that take it (grouped by name), and the
gap between the graphed step and the kernels' sum (launch and dependency latency a graph does not remove).
Writes $OUT/profile_decode.txt and prints a summary.

    python scripts/profile_decode.py --model /dev/shm/q30.gguf --placement gpu [--tokens 64] [--prompt 128]

Routing is the model's own router (a random-weight GGUF's routing collapses onto few experts; the compute per
token does not depend on which experts, only the distinct experts per layer, which the summary prints).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hotexperts.engine.engine import Engine  # noqa: E402
from hotexperts.engine.runner.cuda_graph import EagerDecodeStep  # noqa: E402
from hotexperts.experts.placement import Placement  # noqa: E402


def sync(eng: Engine) -> None:
    if eng.device.type == "cuda":
        torch.cuda.synchronize()


def timed_decode(eng: Engine, first: int, pos: int, n: int) -> float:
    """Greedy T=1 steps from `first` at `pos`: seconds per token (synchronised at the ends only)."""
    tok = first
    sync(eng)
    t0 = time.perf_counter()
    for i in range(n):
        tok = eng.decode_one(tok, pos + i).argmax()
    sync(eng)
    return (time.perf_counter() - t0) / n


def kernel_table(prof, steps: int, cuda: bool) -> tuple[list[tuple[str, int, float]], int, float]:
    """-> [(kernel name, launches per token, µs per token)] by time, kernels per token, µs per token. On a
    CPU run (the script's own test) the operators' self CPU time stands in for kernels."""
    count, total = defaultdict(int), defaultdict(float)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for ev in prof.events():
        if ev.device_type == kind and (cuda or ev.self_cpu_time_total > 0):
            count[ev.name] += 1
            total[ev.name] += ev.device_time if cuda else ev.self_cpu_time_total
    rows = sorted(((k[:90], count[k] // steps, total[k] / steps) for k in count), key=lambda r: -r[2])
    return rows, sum(count.values()) // steps, sum(total.values()) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/dev/shm/q30.gguf")
    ap.add_argument("--placement", default="gpu")
    ap.add_argument("--vram-budget", type=float, default=None, help="GiB")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--profiled", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    budget = None if a.vram_budget is None else int(a.vram_budget * 2**30)
    kw = dict(dtype="bfloat16", device=a.device, max_context=a.prompt + a.tokens + 64)
    place = Placement.parse(a.placement, vram_budget=budget) if budget else Placement.parse(a.placement)
    eng = Engine.load(a.model, placement=place, **kw)
    prompt = [(7 * i + 3) % eng.config.vocab_size for i in range(a.prompt)]
    first = int(eng.prefill(prompt).argmax())
    timed_decode(eng, first, a.prompt, 8)                                   # capture + warm
    graphed = timed_decode(eng, first, a.prompt, a.tokens)
    eng.generator.decode_step = EagerDecodeStep(eng.model, eng.generator.kv, eng.executor, eng.device)
    eager = timed_decode(eng, first, a.prompt, a.tokens)
    cuda = eng.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        timed_decode(eng, first, a.prompt, a.profiled)
    rows, per_tok, us = kernel_table(prof, a.profiled, cuda)
    ex = type(eng.executor).__name__
    lines = [f"model {a.model} placement {a.placement} ({ex}), prompt {a.prompt}",
             f"graphed step {graphed * 1e3:.3f} ms ({1 / graphed:.1f} tok/s); eager {eager * 1e3:.3f} ms "
             f"({1 / eager:.1f} tok/s)",
             f"kernels (CPU: operators) per token {per_tok}, their device time {us / 1e3:.3f} ms per token; "
             f"graphed step minus kernel time {graphed * 1e3 - us / 1e3:.3f} ms ({per_tok} launches: "
             f"{(graphed * 1e6 - us) / max(per_tok, 1):.2f} µs each)",
             "", f"{'µs/token':>9} {'share':>6} {'n/token':>7}  kernel"]
    lines += [f"{t:9.1f} {t / us:6.1%} {n:7d}  {name}" for name, n, t in rows[:40]]
    text = "\n".join(lines)
    (out / "profile_decode.txt").write_text(text + "\n")
    print(text, flush=True)
    eng.close()


if __name__ == "__main__":
    main()
