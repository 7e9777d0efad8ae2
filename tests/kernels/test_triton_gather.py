"""gather_experts: chosen rows copied at their own index, the others untouched (interpreter on CPU)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede the first triton import

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _module():
    from hotexperts.kernels import triton_gather

    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton imported without TRITON_INTERPRET=1 in this process")
    return triton_gather


@pytest.mark.parametrize("dtype, shape", [(torch.float16, (6, 5, 12)), (torch.uint8, (5, 3, 7)),
                                          (torch.int32, (4, 3000))])
def test_gathers_chosen_rows_in_place(dtype, shape):
    tg = _module()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 100, shape, generator=g).to(dtype)
    if DEV == "cuda":
        src = src.pin_memory()
    dst = torch.full(shape, 7, dtype=dtype, device=DEV)
    idx = torch.tensor([shape[0] - 1, 1], device=DEV)
    tg.gather_experts(dst, src, idx)
    got = dst.cpu()
    for e in range(shape[0]):
        want = src[e] if e in (1, shape[0] - 1) else torch.full(shape[1:], 7, dtype=dtype)
        assert torch.equal(got[e], want), e


def test_shape_mismatch_is_a_clear_error():
    tg = _module()
    with pytest.raises(ValueError, match="gather_experts"):
        tg.gather_experts(torch.zeros(3, 4, device=DEV), torch.zeros(3, 5), torch.tensor([0], device=DEV))
