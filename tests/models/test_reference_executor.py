"""DenseExecutor (hotexperts/experts/reference.py): the oracle every other executor is compared with."""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from hotexperts.experts.reference import DenseExecutor
from hotexperts.weights import LayerExperts, QuantizedWeight

E, I, D, T, K = 6, 8, 16, 5, 2


def layer(seed: int = 0) -> LayerExperts:
    g = torch.Generator().manual_seed(seed)
    return LayerExperts(torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g))


def naive(le: LayerExperts, x, ids, w):
    """Per token and slot: w * down(silu(gate x) * up x)."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            h = le.w13[e] @ x[t]
            y[t] += w[t, k] * (le.w2[e] @ (F.silu(h[:I]) * h[I:]))
    return y


def routed(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return x, ids, torch.rand(T, K, generator=g)


def test_matches_naive_sum_and_skips_minus_one():
    # float64: the batched and the per-token sums round differently, and these unscaled random weights make
    # fp32 outputs cancel (a 1.8e-5 relative gap seen on the CI box's CPU, beyond fp32's default tolerance)
    le = LayerExperts(*(w.double() for w in (layer().w13, layer().w2)))
    ex = DenseExecutor({3: le}, "cpu", torch.float64)
    x, ids, w = (t.double() if t.is_floating_point() else t for t in routed())
    torch.testing.assert_close(ex(3, x, ids, w), naive(le, x, ids, w))
    ids[0, 1] = ids[2, 0] = -1
    torch.testing.assert_close(ex(3, x, ids, w), naive(le, x, ids, w))
    assert ex(3, x, ids, w).abs().sum() > 0


def test_on_route_and_end_step():
    ex = DenseExecutor({0: layer()})
    assert ex.on_route is None
    seen = []
    ex.on_route = lambda lay, ids, w: seen.append((lay, ids.clone(), w.clone()))
    x, ids, w = routed()
    ex(0, x, ids, w)
    ex.end_step()
    assert len(seen) == 1 and seen[0][0] == 0 and torch.equal(seen[0][1], ids)


def test_bf16_output_dtype():
    ex = DenseExecutor({0: layer()}, "cpu", torch.bfloat16)
    x, ids, w = routed()
    y = ex(0, x.bfloat16(), ids, w.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), naive(layer(), x, ids, w), atol=0.5, rtol=0.05)


def test_quantized_weights_are_dequantized(monkeypatch):
    le = layer()
    fake = types.ModuleType("hotexperts.quant")                    # stand-in for quant.dequantize

    def dequantize(qw: QuantizedWeight) -> torch.Tensor:
        return qw.q.float() * qw.scale[..., None]

    fake.dequantize = dequantize
    monkeypatch.setitem(sys.modules, "hotexperts.quant", fake)
    q = LayerExperts(QuantizedWeight("int8", le.w13.round().to(torch.int8), torch.full((E, 2 * I), 0.5)),
                     QuantizedWeight("int8", le.w2.round().to(torch.int8), torch.full((E, D), 0.25)))
    want = LayerExperts(le.w13.round() * 0.5, le.w2.round() * 0.25)
    x, ids, w = routed()
    torch.testing.assert_close(DenseExecutor({0: q})(0, x, ids, w), naive(want, x, ids, w))
