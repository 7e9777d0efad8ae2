"""Quantization formats: round trips, error bounds, nibble layout, GGUF-style affine mapping."""

from __future__ import annotations

import pytest
import torch

from hotexperts import quant
from hotexperts.weights import LayerExperts, QuantizedWeight


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_int8_exact_on_grid_and_bounded_error():
    g = gen()
    scale = torch.rand(3, 5, generator=g) + 0.1                               # [E, N]
    q = torch.randint(-127, 128, (3, 5, 64), generator=g)
    q[..., 0] = 127                                                           # row max hits the grid end
    w = q.float() * scale.unsqueeze(-1)
    qw = quant.quantize_int8(w)
    assert qw.fmt == "int8" and qw.q.dtype == torch.int8 and qw.scale.shape == (3, 5)
    torch.testing.assert_close(quant.dequantize(qw), w, rtol=1e-6, atol=0)
    x = torch.randn(4, 64, generator=g)
    err = (quant.dequantize(quant.quantize_int8(x)) - x).abs()
    assert (err <= x.abs().amax(-1, keepdim=True) / 254 + 1e-7).all()


def test_int8_zero_rows():
    qw = quant.quantize_int8(torch.zeros(2, 32))
    assert torch.equal(quant.dequantize(qw), torch.zeros(2, 32))


def test_pack_layout_low_nibble_is_even_column():
    q = torch.tensor([[1, 2, 3, 4]])
    p = quant.pack_int4(q)
    assert p.tolist() == [[1 | 2 << 4, 3 | 4 << 4]]
    q = torch.randint(0, 16, (3, 64), generator=gen())
    assert torch.equal(quant.unpack_int4(quant.pack_int4(q)), q.to(torch.uint8))


def test_int4g32_exact_on_grid():
    g = gen(1)
    scale = (torch.rand(2, 4, 3, generator=g) * 0.1 + 0.01).half()          # [E, N, G]
    zero = (torch.randn(2, 4, 3, generator=g) * 0.1).half()
    q = torch.randint(0, 16, (2, 4, 3, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15                                              # every group spans the grid
    w = ((q - 8).float() * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2)
    qw = quant.quantize_int4g32(w)
    assert qw.q.shape == (2, 4, 48) and qw.scale.shape == (2, 4, 3) and qw.shape == (2, 4, 96)
    assert torch.equal(qw.scale, scale) and torch.equal(qw.zero, zero)
    assert torch.equal(quant.dequantize(qw), w)


def test_int4g32_error_bound_and_constant_groups():
    w = torch.randn(5, 128, generator=gen(2))
    w[0, :32] = 0.25                                                          # a flat group
    qw = quant.quantize_int4g32(w, scale_dtype=torch.float32)
    dq = quant.dequantize(qw)
    step = qw.scale.repeat_interleave(32, dim=-1)
    assert ((dq - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(dq[0, :32], w[0, :32])
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize_int4g32(torch.randn(2, 48))


def test_gguf_affine_mapping_q4k_and_q4_0():
    g = gen(3)
    q = torch.randint(0, 16, (4, 64), generator=g)                           # unpacked, [N, K]
    d, dmin = 0.02, 0.01
    sc = torch.randint(1, 64, (4, 2), generator=g).float()                   # Q4_K 6-bit sub-block scales
    m = torch.randint(0, 64, (4, 2), generator=g).float()                    # and mins
    a, b = d * sc, -dmin * m                                                  # w = a q + b
    qw = quant.int4g32_from_affine(q, a, b, scale_dtype=torch.float32)
    want = a.repeat_interleave(32, -1) * q + b.repeat_interleave(32, -1)
    torch.testing.assert_close(quant.dequantize(qw), want, rtol=1e-6, atol=1e-6)
    q40 = quant.int4g32_from_affine(q, a, -8 * a)                            # Q4_0: w = d (q - 8)
    assert torch.equal(q40.zero, torch.zeros_like(q40.zero))


def test_dequantize_plain_tensor_and_dtype():
    w = torch.randn(2, 3, 32).bfloat16()
    assert quant.dequantize(w).dtype == torch.float32
    assert quant.dequantize(quant.quantize_int8(w), torch.float64).dtype == torch.float64


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4g32", "int8g32", "int8g16", "q4_k"])
def test_quantize_layer(fmt):
    n = 256 if fmt == "q4_k" else 32                                          # q4_k rows: 256-weight blocks
    layer = LayerExperts(torch.randn(10, 2 * n, n, generator=gen(4)), torch.randn(10, n, n, generator=gen(5)))
    ql = quant.quantize_layer(layer, fmt)
    assert isinstance(ql.w13, QuantizedWeight)
    assert ql.w13.shape == (10, 2 * n, n) and ql.w2.shape == (10, n, n)
    assert ql.w13.fmt == {"int8": "int8", "int4": "int4g32"}.get(fmt, fmt)
    for a, b in ((ql.w13, layer.w13), (ql.w2, layer.w2)):
        rel = (quant.dequantize(a) - b).norm() / b.norm()
        assert rel < (0.01 if fmt.startswith("int8") else 0.1)
    assert ql.expert_nbytes < layer.expert_nbytes / (1.5 if fmt.startswith("int8g") else 3)
    assert quant.quantize_layer(layer, "none").w13 is layer.w13
    with pytest.raises(ValueError, match="unknown expert quantization"):
        quant.quantize_layer(layer, "int3")


@pytest.mark.parametrize("group", [16, 32])
def test_int8g_from_int4g32_is_exact(group):
    w = quant.quantize_int4g32(torch.randn(3, 8, 64, generator=gen(6)))
    w8 = quant.int8g_from_int4g32(w, group)
    assert w8.fmt == f"int8g{group}" and w8.group == group and w8.q.dtype == torch.int8
    assert w8.q.shape == (3, 8, 64) and w8.scale.shape == (3, 8, 64 // group) and w8[1].shape == (8, 64)
    assert torch.equal(quant.dequantize(w8), quant.dequantize(w))
    with pytest.raises(ValueError, match="16 or 32"):
        quant.int8g_from_int4g32(w, 8)


def test_int8g_symmetric_rounding_bound():
    w = torch.randn(4, 16, 96, generator=gen(7))
    qw = quant.quantize_int8g(w, 16, torch.float32)
    assert qw.zero is None and qw.nbytes == 4 * 16 * 96 + 4 * 16 * 6 * 4
    step = w.unflatten(-1, (-1, 16)).abs().amax(-1, keepdim=True) / 127
    err = (quant.dequantize(qw) - w).unflatten(-1, (-1, 16)).abs()
    assert (err <= step / 2 + 1e-7).all()


def test_q4_k_container_and_packer():
    w = torch.randn(3, 4, 512, generator=gen(8))
    qw = quant.quantize_q4_k(w)
    assert qw.fmt == "q4_k" and qw.scale is None and qw.zero is None
    assert qw.q.dtype == torch.uint8 and qw.q.shape == (3, 4, 2 * 144) and qw.shape == (3, 4, 512)
    assert qw.group == 256 and qw.nbytes == 3 * 4 * 2 * 144                 # 4.5 bits per weight
    assert qw[1].shape == (4, 512) and qw[torch.tensor([2, 0])].shape == (2, 4, 512)
    assert qw.to("cpu").scale is None
    rel = (quant.dequantize(qw) - w).norm() / w.norm()
    assert rel < 0.1
    assert torch.equal(quant.dequantize(qw[2]), quant.dequantize(qw)[2])
    with pytest.raises(ValueError, match="multiple of 256"):
        quant.quantize_q4_k(torch.randn(2, 96))


def test_q4_k_dequantize_formula():
    """One block written by hand: w = d * sc_j * q - dmin * m_j, sub-block 2c in chunk c's low nibbles."""
    sc, m = torch.arange(8) + 1, torch.arange(8) * 2                           # 6-bit scales and mins
    from hotexperts.loading.gguf_quants import pack_k_scales

    q = torch.randint(0, 16, (8, 32), generator=gen(9), dtype=torch.uint8)     # [sub-block, weight]
    qs = (q[0::2] | (q[1::2] << 4)).flatten()                                  # chunk c: 2c low, 2c + 1 high
    d, dmin = torch.tensor([0.5]).half(), torch.tensor([0.25]).half()
    blk = torch.cat((d.view(torch.uint8), dmin.view(torch.uint8), pack_k_scales(sc, m), qs))
    got = quant.dequantize(QuantizedWeight("q4_k", blk.view(1, 144), None))
    want = (0.5 * sc[:, None] * q.float() - 0.25 * m[:, None]).flatten()
    assert torch.equal(got[0], want)


def test_cat_keeps_missing_parts_none():
    from hotexperts.weights import cat

    a, b = quant.quantize_q4_k(torch.randn(2, 3, 256)), quant.quantize_q4_k(torch.randn(1, 3, 256))
    c = cat([a, b])
    assert c.scale is None and c.shape == (3, 3, 256) and torch.equal(c.q[2], b.q[0])
    assert cat([a, a], 1).shape == (2, 6, 256)
    i = quant.quantize_int8g(torch.randn(2, 3, 64))
    assert cat([i, i]).zero is None and cat([i, i]).scale.shape == (4, 3, 2)


@pytest.mark.parametrize("fmt", ["mxfp4", "iq4_nl", "iq4_xs"])
def test_lut4_round_trip_and_layer(fmt):
    w = torch.randn(2, 3, 256, generator=gen(3))
    qw = quant.quantize_lut4(w, fmt)
    assert qw.shape == (2, 3, 256) and qw.group == (256 if fmt == "iq4_xs" else 32)
    assert qw.nbytes * 8 / w.numel() == {"mxfp4": 4.25, "iq4_nl": 4.5, "iq4_xs": 4.25}[fmt]
    # values already on the grid come back exactly (scale . table[index] is what dequantize computes)
    again = quant.quantize_lut4(quant.dequantize(qw), fmt)
    torch.testing.assert_close(quant.dequantize(again), quant.dequantize(qw), rtol=0, atol=0)
    le = quant.quantize_layer(LayerExperts(w, torch.randn(2, 8, 256, generator=gen(4))), fmt)
    assert le.w13.fmt == fmt and le.w2.fmt == fmt
    with pytest.raises(ValueError, match="multiple of"):
        quant.quantize_lut4(torch.randn(2, 48), fmt)
