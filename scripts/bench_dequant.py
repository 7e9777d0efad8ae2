"""Sweep dequant_slots' block shape on the GPU (the prompt path's dequantize, kernels/triton_dequant.py):
one chunk of --experts int4g32 Qwen3-30B-A3B-shaped experts (w13 [2I, D] and w2 [D, I]) into bf16; median µs
per launch and GB/s moved (packed read + bf16 write). One JSON line per (matrix, block).

    python scripts/bench_dequant.py --experts 27
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hotexperts.kernels.triton_dequant import dequant_slots  # noqa: E402
from hotexperts.quant import quantize_int4g32  # noqa: E402

BLOCKS = [(16, 128, 4), (32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (8, 256, 4), (64, 256, 8),
          (32, 512, 8)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=27)
    p.add_argument("--pool", type=int, default=128)
    a = p.parse_args()
    D, I = 2048, 768
    for name, (N, Kc) in (("w13", (2 * I, D)), ("w2", (D, I))):
        w = quantize_int4g32(torch.randn(a.pool, N, Kc, device="cuda") * 0.02)
        idx = torch.randperm(a.pool, device="cuda")[:a.experts]
        out = torch.empty(a.experts, N, Kc, dtype=torch.bfloat16, device="cuda")
        moved = a.experts * N * Kc * (0.5 + 2) + a.experts * N * Kc // 32 * 4
        ref = None
        for blk in BLOCKS:
            try:
                dequant_slots(w, idx, torch.bfloat16, out, block=blk)
            except Exception as e:  # noqa: BLE001 - a block shape the compiler rejects: report, go on
                print(json.dumps({"matrix": name, "block": blk, "error": str(e)[:200]}), flush=True)
                continue
            if ref is None:
                ref = out.clone()
            ok = torch.equal(out, ref)
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(42)]
            for i in range(21):
                ev[2 * i].record()
                dequant_slots(w, idx, torch.bfloat16, out, block=blk)
                ev[2 * i + 1].record()
            torch.cuda.synchronize()
            us = sorted(ev[2 * i].elapsed_time(ev[2 * i + 1]) * 1e3 for i in range(1, 21))[10]
            print(json.dumps({"matrix": name, "block": blk, "us": round(us, 1),
                              "gb_s": round(moved / us / 1e3, 1), "same_bits": ok}), flush=True)


if __name__ == "__main__":
    main()
