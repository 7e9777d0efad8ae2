"""Do small CPU expert calls (a cache's 1-2 misses per layer) run faster from 2 MiB pages than from 4 KiB
ones, and does pinning change that? One int4g32 Qwen3-30B-A3B-shaped layer cloned into --gib GiB of
layers (far beyond L3) in each memory kind, then cpu_moe calls of 1, 2 and 8 random experts of a random
layer (median µs per call, GB/s of expert weights):
  torch      the torch CPU allocator (what an unpinned store uses)
  pinned     tensor.pin_memory() (cudaHostAlloc: what the store's pin() does today)
  thp        anonymous mmap, 2 MiB aligned, madvise(MADV_HUGEPAGE) before the first touch
  thp+reg    the same, then cudaHostRegister (pinned, huge pages kept)
Prints the kernel's transparent-huge-page settings, AnonHugePages of this process, one JSON line per row.

    python scripts/bench_cpu_pages.py --gib 4
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hotexperts.config import DEFAULT_KERNELS  # noqa: E402
from hotexperts.kernels import cpu_moe as cm  # noqa: E402
from hotexperts.quant import quantize_int4g32  # noqa: E402
from hotexperts.weights import LayerExperts, QuantizedWeight  # noqa: E402

MADV_HUGEPAGE, HUGE = 14, 2 << 20
_keep: list = []                                   # mmaps backing the thp tensors


def thp_empty(shape, dtype, register: bool) -> torch.Tensor:
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    m = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    off = (-base) % HUGE
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise(ctypes.c_void_p(base + off), ctypes.c_size_t(n), MADV_HUGEPAGE)
    t = torch.frombuffer(m, dtype=torch.uint8, count=n, offset=off).view(dtype).view(shape)
    _keep.append(m)
    if register:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), n, 0)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister failed: {rc}")
    return t


def place(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "torch":
        return t.clone()
    if kind == "pinned":
        return t.pin_memory()
    out = thp_empty(t.shape, t.dtype, register=kind == "thp+reg")
    out.copy_(t)
    return out


def layers_in(kind: str, base: LayerExperts, n: int) -> list[LayerExperts]:
    def w(q: QuantizedWeight) -> QuantizedWeight:
        return QuantizedWeight(q.fmt, place(q.q, kind), place(q.scale, kind), place(q.zero, kind))

    return [LayerExperts(w(base.w13), w(base.w2)) for _ in range(n)]


def anon_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages"):
            return int(line.split()[1])
    return -1


def time_calls(layers, k: int, calls: int, D: int) -> float:
    g = torch.Generator().manual_seed(k)
    E = layers[0].w13.shape[0]
    x, out = torch.randn(1, D).bfloat16(), torch.empty(1, D, dtype=torch.float32)
    w = torch.full((1, k), 1.0 / k)
    picks = [(int(torch.randint(len(layers), (1,), generator=g)), torch.randperm(E, generator=g)[:k][None])
             for _ in range(calls)]
    ts = []
    for li, ids in picks:
        t0 = time.perf_counter()
        cm.cpu_moe(x, ids, w, layers[li], out)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=4.0)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--kinds", default="torch,pinned,thp,thp+reg")
    p.add_argument("--experts", type=int, default=128)
    a = p.parse_args()
    D, I = 2048, 768
    for f in ("enabled", "defrag"):
        path = Path("/sys/kernel/mm/transparent_hugepage") / f
        print(f"# thp {f}: {path.read_text().strip() if path.exists() else 'n/a'}", flush=True)
    print(f"# backend {cm.cpu_moe_backend()}, threads {DEFAULT_KERNELS.threads()}", flush=True)
    g = torch.Generator().manual_seed(0)
    base = LayerExperts(quantize_int4g32(torch.randn(a.experts, 2 * I, D, generator=g) * 0.02),
                        quantize_int4g32(torch.randn(a.experts, D, I, generator=g) * 0.02))
    n = max(2, round(a.gib * 2**30 / (a.experts * base.expert_nbytes)))
    cuda = torch.cuda.is_available()
    rows = []
    for kind in a.kinds.split(","):
        if kind in ("pinned", "thp+reg") and not cuda:
            continue
        before = anon_huge_kb()
        layers = layers_in(kind, base, n)
        row = {"kind": kind, "gib": round(n * a.experts * base.expert_nbytes / 2**30, 2),
               "anon_huge_mib": (anon_huge_kb() - before) // 1024}
        for k in (1, 2, 8):
            us = time_calls(layers, k, a.calls, D) * 1e6
            row[f"k{k}_us"] = round(us, 1)
            row[f"k{k}_gb_s"] = round(k * base.expert_nbytes / us / 1e3, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if kind == "thp+reg":
            for L in layers:
                for t in (L.w13.q, L.w13.scale, L.w13.zero, L.w2.q, L.w2.scale, L.w2.zero):
                    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        del layers
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cpu_pages.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
