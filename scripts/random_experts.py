"""Random expert layers in every CPU kernel format, for the CPU MoE benchmarks (bench_cpu_micro.py,
bench_cpu_moe.py): seeded, at realistic scale magnitudes, no download.

    random_layer(fmt, E, D, I, gen) -> LayerExperts(w13 [E, 2I, D], w2 [E, D, I]) in fmt: int4g32, int8,
        int8g32 / int8g16 / int8g16z (z: with a zero, a Q4_K_M down matrix), a LUT4 format (mxfp4, iq4_nl,
        iq4_xs), or anything else: bf16
    clone_layer(layer) -> a copy with its own storage (a model far larger than L3 from one random layer)
"""

from __future__ import annotations

import torch

from hotexperts.weights import LUT4_BLOCKS, LayerExperts, QuantizedWeight


def lut4_random(fmt: str, E: int, N: int, K: int, gen: torch.Generator) -> QuantizedWeight:
    """Random LUT4 blocks (indices anywhere, scales of a realistic size: e8m0 120 / fp16 1e-3)."""
    bw, bb = LUT4_BLOCKS[fmt]
    b = torch.randint(0, 256, (E, N, K // bw, bb), dtype=torch.uint8, generator=gen)
    if fmt == "mxfp4":
        b[..., 0] = 120
    else:
        b[..., 0:2] = torch.tensor([1e-3], dtype=torch.float16).view(torch.uint8)
    return QuantizedWeight(fmt, b.flatten(-2), None)


def random_matrix(fmt: str, E: int, N: int, K: int, gen: torch.Generator):
    """E random [N, K] matrices in fmt."""
    if fmt in LUT4_BLOCKS:
        return lut4_random(fmt, E, N, K, gen)
    if fmt == "int4g32":
        q = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, generator=gen)
        s = (torch.rand(E, N, K // 32, generator=gen) * 0.02 + 0.005).half()
        return QuantizedWeight(fmt, q, s, (torch.randn(E, N, K // 32, generator=gen) * 0.01).half())
    if fmt == "int8":
        q = torch.randint(-127, 128, (E, N, K), dtype=torch.int8, generator=gen)
        return QuantizedWeight(fmt, q, torch.rand(E, N, generator=gen) * 4e-4 + 1e-4)
    if fmt in ("int8g32", "int8g16", "int8g16z"):
        g = int(fmt[5:7])
        q = torch.randint(-127, 128, (E, N, K), dtype=torch.int8, generator=gen)
        s = (torch.rand(E, N, K // g, generator=gen) * 4e-4 + 1e-4).half()
        z = (torch.randn(E, N, K // g, generator=gen) * 0.01).half() if fmt.endswith("z") else None
        return QuantizedWeight(fmt[:7], q, s, z)
    return (torch.randn(E, N, K, generator=gen) * 0.03).to(torch.bfloat16)


def random_layer(fmt: str, E: int, D: int, I: int, gen: torch.Generator) -> LayerExperts:
    return LayerExperts(random_matrix(fmt, E, 2 * I, D, gen), random_matrix(fmt, E, D, I, gen))


def clone_layer(layer: LayerExperts) -> LayerExperts:
    def clone(w):
        if not isinstance(w, QuantizedWeight):
            return w.clone()
        s, z = (None if t is None else t.clone() for t in (w.scale, w.zero))   # q4_k / LUT4: no scale tensor
        return QuantizedWeight(w.fmt, w.q.clone(), s, z)

    return LayerExperts(clone(layer.w13), clone(layer.w2))
