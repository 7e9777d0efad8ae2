"""qlinear over int8gG dense weights: the Triton GEMV (interpreter on CPU, the real kernel on CUDA) and the
dequantize + matmul path both equal a float64 reference of the same quantized weights."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede the first triton import

from hotexperts.kernels.qlinear import qlinear  # noqa: E402
from hotexperts.quant import dequantize, quantize_int8g  # noqa: E402
from hotexperts.weights import QuantizedWeight  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _weight(N: int, K: int, group: int, zero: bool, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    w = quantize_int8g(torch.randn(N, K, generator=g), group)
    z = (torch.randn(N, K // group, generator=g) * 0.01).half() if zero else None
    return QuantizedWeight(w.fmt, w.q, w.scale, z)


def _reference(x, w, bias):
    y = x.double() @ dequantize(w, torch.float64).T
    return y if bias is None else y + bias.double()


def _gemv_module():
    from hotexperts.kernels import triton_qlinear

    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton imported without TRITON_INTERPRET=1 in this process")
    return triton_qlinear


@needs_triton
@pytest.mark.parametrize("N, K, group, zero, T", [(40, 256, 32, False, 1), (7, 512, 16, True, 2),
                                                  (1030, 64, 32, False, 1), (33, 96, 32, True, 3)])
def test_triton_gemv_matches_the_reference(N, K, group, zero, T):
    mod = _gemv_module()
    w = _weight(N, K, group, zero)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, K, generator=g)
    bias = torch.randn(N, generator=g) if zero else None
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    out = torch.empty(T, N, device=DEV)
    mod.gemv(dev(x), dev(w.q), dev(w.scale), dev(w.zero), dev(bias), group, out)
    torch.testing.assert_close(out.cpu().double(), _reference(x, w, bias), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("T", [1, 9])
def test_qlinear_dequantize_path_matches_the_reference(T):
    w = _weight(24, 128, 32, True, seed=3)
    x = torch.randn(T, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(qlinear(x, w), _reference(x, w, None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_uses_the_gemv_and_matches():
    w = _weight(4096, 2048, 32, False)
    wc = QuantizedWeight(w.fmt, w.q.cuda(), w.scale.cuda(), None)
    x = torch.randn(1, 2048).bfloat16()
    got = qlinear(x.cuda(), wc).float().cpu()
    torch.testing.assert_close(got.double(), _reference(x.float(), w, None), rtol=2e-2, atol=2e-2)
