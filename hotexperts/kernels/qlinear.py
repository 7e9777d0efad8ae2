"""Linear layers over quantized dense weights kept quantized on their device (issue 16: VRAM for experts).

    y = qlinear(x [T, K], w: QuantizedWeight [N, K], bias [N] | None) -> [T, N] in x.dtype
        w.fmt "int8" (scale per row) or "int8g32" / "int8g16" (scale, optional zero, per 32 / 16 columns):
        the exact form of GGUF Q8_0 (and of Q4_K / Q5_* / Q6_K, loading/gguf_quants.py)
    CUDA with Triton, T <= GEMV_MAX_T (decode): one GEMV launch per call that reads the int8 rows and their
        group scales in place (no dequantized copy), fp32 accumulation; a torch custom op
        (hotexperts::qlinear_gemv) so torch.compile and CUDA graphs see one opaque, capturable call
    otherwise (prompt chunks, CPU): the weight dequantized into x.dtype, then F.linear (cuBLAS / MKL): one
        [N, K] temporary at a time
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hotexperts.kernels.optional import triton_module
from hotexperts.quant import dequantize
from hotexperts.weights import QuantizedWeight

GEMV_MAX_T = 4
GEMV_FORMATS = ("int8g32", "int8g16")


def _triton_kernels():
    """kernels/triton_qlinear.py, or None when Triton cannot be imported (then: dequantize + F.linear)."""
    return triton_module("triton_qlinear")


def qlinear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.is_cuda and x.shape[0] <= GEMV_MAX_T and w.fmt in GEMV_FORMATS and _triton_kernels() is not None:
        return torch.ops.hotexperts.qlinear_gemv(x, w.q, w.scale, w.zero, bias, w.group)
    return F.linear(x, dequantize(w, x.dtype), bias)


@torch.library.custom_op("hotexperts::qlinear_gemv", mutates_args=())
def qlinear_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x [T, K], q [N, K] int8, scale/zero [N, K/group] (int8: [N], group K) -> [T, N] x.dtype."""
    out = torch.empty((x.shape[0], q.shape[0]), dtype=x.dtype, device=x.device)
    _triton_kernels().gemv(x.contiguous(), q, scale, zero, bias, group, out)
    return out


@qlinear_gemv.register_fake
def _(x, q, scale, zero, bias, group):
    return x.new_empty((x.shape[0], q.shape[0]))
