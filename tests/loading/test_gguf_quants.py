"""GGML blocks <-> int4g32 / int8gG / float: exact Q4_0/Q4_1/Q4_K -> int4g32 and Q8_0/Q5_0/Q5_1/Q5_K/Q6_K
(and the Q4 types) -> int8gG mappings on arbitrary valid bytes, packers checked against the gguf package's own
dequantizer, clear errors for unsupported types."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from hotexperts.errors import ModelLoadError
from hotexperts.loading import gguf_quants as gq
from hotexperts.quant import dequantize as dequantize_int4


def random_blocks(qtype, rows=6, blocks=3, seed=0):
    """Arbitrary bytes in qtype's layout with finite, realistic fp16 super-block scales."""
    rng = np.random.default_rng(seed)
    bs = gq.block_bytes(qtype)[1]
    raw = rng.integers(0, 256, size=(rows, blocks, bs), dtype=np.uint8)
    halves = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2), Q.Q8_0: (0,), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
              Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,), Q.MXFP4: ()}[qtype]
    for at in halves:
        raw[..., at:at + 2] = (rng.standard_normal((rows, blocks)) * 0.02).astype(np.float16)[..., None].view(
            np.uint8)
    return raw.reshape(rows, blocks * bs)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4g32_is_exact_with_fp32_scales(qtype):
    raw = random_blocks(qtype)
    want = quants.dequantize(raw, qtype)                                   # llama.cpp's formula, float32
    got = dequantize_int4(gq.to_int4g32(raw, qtype, torch.float32)).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4g32_fp16_scales_are_tight(qtype):
    raw = random_blocks(qtype, seed=1)
    want = quants.dequantize(raw, qtype)
    w = gq.to_int4g32(raw, qtype)                                          # default: fp16 scale / zero
    assert w.fmt == "int4g32" and w.scale.dtype == torch.float16 and w.q.shape == (6, want.shape[1] // 2)
    got = dequantize_int4(w).numpy()
    group_range = np.abs(want).reshape(6, -1, 32).max(-1, keepdims=True)
    err = np.abs(got - want).reshape(6, -1, 32) / np.maximum(group_range, 1e-12)
    assert err.max() < 2 ** -9
    if qtype == Q.Q4_0:                                                    # d is fp16 already: bit-exact
        np.testing.assert_array_equal(got, want)


def test_int4g32_batched_leading_dims():
    raw = random_blocks(Q.Q4_K, rows=12).reshape(3, 4, -1)                 # [E, N, bytes]
    w = gq.to_int4g32(raw, Q.Q4_K, torch.float32)
    assert w.q.shape == (3, 4, 384) and w.scale.shape == (3, 4, 24)
    np.testing.assert_array_equal(dequantize_int4(w).numpy(),
                                  quants.dequantize(raw, Q.Q4_K).reshape(3, 4, 768))


INT8_CASES = [(Q.Q8_0, 32), (Q.Q8_0, 16), (Q.Q5_0, 32), (Q.Q5_1, 32), (Q.Q5_K, 32), (Q.Q5_K, 16),
              (Q.Q6_K, 16), (Q.Q4_K, 16), (Q.Q4_0, 32), (Q.Q4_1, 16), (Q.IQ4_NL, 32), (Q.IQ4_XS, 32)]


@pytest.mark.parametrize("qtype,group", INT8_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_int8g_is_exact_with_fp32_scales(qtype, group):
    raw = random_blocks(qtype, seed=2).reshape(2, 3, -1)                   # [E, N, bytes]
    want = quants.dequantize(raw.reshape(6, -1), qtype).reshape(2, 3, -1)
    own_group, zero = gq.INT8_TYPES.get(qtype, (32, True))
    w = gq.to_int8g(raw, qtype, group, zero, torch.float32)
    K = want.shape[-1]
    assert w.fmt == f"int8g{group}" and w.q.dtype == torch.int8 and w.q.shape == (2, 3, K)
    assert w.scale.shape == (2, 3, K // group) and (w.zero is None) == (not zero)
    np.testing.assert_array_equal(dequantize_int4(w).numpy(), want)
    w16 = gq.to_int8g(raw, qtype, group, True)                             # fp16 scale/zero, zero forced on
    group_range = np.abs(want).reshape(2, 3, -1, 16).max(-1, keepdims=True)
    err = np.abs(dequantize_int4(w16).numpy() - want).reshape(2, 3, -1, 16) / np.maximum(group_range, 1e-12)
    assert err.max() < 2 ** -9


def test_mxfp4_is_exact_with_bf16_scales():
    """MXFP4's scales are powers of two over fp32's whole range (e8m0): bf16 holds them exactly."""
    raw = random_blocks(Q.MXFP4, seed=3)
    raw.reshape(6, 3, 17)[..., 0] = np.arange(18).reshape(6, 3) * 11 + 2    # exponents 2 .. 189 (fp16 can't)
    want = quants.dequantize(raw, Q.MXFP4)
    w = gq.to_int8g(raw, Q.MXFP4, 32, False, torch.bfloat16)
    assert w.fmt == "int8g32" and w.zero is None
    np.testing.assert_array_equal(dequantize_int4(w).numpy(), want)


def test_int8_spec_picks_the_common_format():
    assert gq.int8_spec({Q.Q8_0}) == (32, False)
    assert gq.int8_spec({Q.Q6_K}) == (16, False)
    assert gq.int8_spec({Q.Q4_K, Q.Q6_K}) == (16, True)                    # llama.cpp's Q4_K_M
    assert gq.int8_spec({Q.Q5_K, Q.Q8_0}) == (32, True)
    assert gq.int8_spec({Q.Q4_K, Q.Q3_K}) is None and gq.int8_spec({Q.BF16}) is None
    with pytest.raises(ModelLoadError, match="does not map onto int8g32"):
        gq.to_int8g(np.zeros((2, 210), np.uint8), Q.Q6_K, 32, False)


def test_k_scales_roundtrip():
    rng = np.random.default_rng(0)
    sc, m = torch.from_numpy(rng.integers(0, 64, (5, 8))), torch.from_numpy(rng.integers(0, 64, (5, 8)))
    sc2, m2 = gq.k_scales(gq.pack_k_scales(sc, m))
    assert torch.equal(sc2.long(), sc) and torch.equal(m2.long(), m)


@pytest.mark.parametrize("qtype,tol", [(Q.Q4_K, 0.2), (Q.Q5_K, 0.1), (Q.Q6_K, 0.08), (Q.Q4_0, 0.3),
                                       (Q.Q4_1, 0.2), (Q.Q8_0, 0.02)])
def test_packers_roundtrip_through_gguf(qtype, tol):
    """Our packers write bytes gguf's dequantizer reads back close to the input (layout is right)."""
    x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    raw = gq.quantize(x, qtype)
    per_block, nbytes = gq.block_bytes(qtype)
    assert raw.dtype == np.uint8 and raw.shape == (4, 512 // per_block * nbytes)
    err = np.abs(quants.dequantize(raw, qtype) - x)
    assert err.max() < tol and err.mean() < tol / 3


def test_dequantize_float_types():
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    bf = quants.quantize(x, Q.BF16)                                        # uint8 bytes, like the reader
    want = torch.from_numpy(x).bfloat16().float()
    assert torch.equal(gq.dequantize(bf, Q.BF16, (3, 64)), want)
    half = torch.from_numpy(x).half().float()
    assert torch.equal(gq.dequantize(x.astype(np.float16), Q.F16, (3, 64)), half)


def test_unsupported_type_is_one_clear_error():
    with pytest.raises(ModelLoadError, match="blk.0.x.*I32.*not supported"):
        gq.dequantize(np.zeros((2, 32), np.int32), Q.I32, (2, 32), "blk.0.x")
    with pytest.raises(ModelLoadError, match="does not map onto int4g32"):
        gq.to_int4g32(np.zeros((2, 34), np.uint8), Q.Q8_0)


# ---- q4_k: the file's Q4_K blocks kept as they are ----

def test_q4_k_keeps_the_bytes_and_dequantizes_like_gguf():
    raw = random_blocks(Q.Q4_K, rows=12, seed=4).reshape(3, 4, -1)          # [E, N, bytes], arbitrary bytes
    w = gq.to_q4_k(raw)
    assert w.fmt == "q4_k" and w.scale is None and w.q.shape == (3, 4, 3 * 144) and w.shape == (3, 4, 768)
    assert np.shares_memory(w.q.numpy(), raw)                              # no conversion, no copy
    want = quants.dequantize(raw.reshape(12, -1), Q.Q4_K).reshape(3, 4, 768)
    np.testing.assert_array_equal(dequantize_int4(w).numpy(), want)        # bit for bit
    np.testing.assert_array_equal(dequantize_int4(w[1]).numpy(), want[1])
    with pytest.raises(ModelLoadError, match="144-byte blocks"):
        gq.to_q4_k(np.zeros((2, 100), np.uint8))


def test_q4_k_of_our_packer_equals_gguf_and_int4g32():
    from hotexperts.quant import quantize_q4_k

    x = torch.from_numpy(np.random.default_rng(5).standard_normal((6, 512)).astype(np.float32))
    qw = quantize_q4_k(x)
    raw = gq.quantize(x.numpy(), Q.Q4_K)
    np.testing.assert_array_equal(qw.q.numpy(), raw)                       # the writers' packer
    want = quants.dequantize(raw, Q.Q4_K)
    np.testing.assert_array_equal(dequantize_int4(qw).numpy(), want)
    np.testing.assert_array_equal(dequantize_int4(gq.to_int4g32(raw, Q.Q4_K, torch.float32)).numpy(), want)


# ---- 4-bit lookup types kept at native size (weights.py LUT4) ----

def lut4_blocks(qtype, rows=4, blocks=3, seed=0):
    """Arbitrary valid LUT4 bytes; MXFP4 exponents cover subnormal (0, 1) to large scales."""
    raw = random_blocks(qtype, rows, blocks, seed).reshape(rows, blocks, -1)
    if qtype == Q.MXFP4:
        raw[..., 0] = np.random.default_rng(seed).choice([0, 1, 2, 100, 120, 127, 130, 200], (rows, blocks))
    return raw.reshape(rows, -1)


def numpy_lut4(raw: np.ndarray, qtype) -> np.ndarray:
    """An independent reference after ggml's C (dequantize_row_mxfp4 / _iq4_nl / _iq4_xs), block by block."""
    bw, bb = gq.block_bytes(qtype)
    table = np.array(gq.MXFP4_VALUES if qtype == Q.MXFP4 else gq.KVALUES, dtype=np.float32)
    out = []
    for blk in raw.reshape(-1, bb):
        if qtype == Q.IQ4_XS:
            d = np.float32(blk[0:2].view(np.float16)[0])
            sh = int(blk[2:4].view(np.uint16)[0])
            for ib in range(8):
                ls = ((int(blk[4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
                qs = blk[8 + 16 * ib: 24 + 16 * ib]
                dl = np.float32(d * np.float32(ls - 32))
                out += [dl * table[qs & 15], dl * table[qs >> 4]]
            continue
        if qtype == Q.MXFP4:
            d = np.float32(np.ldexp(np.float64(1.0), int(blk[0]) - 128))
        else:
            d = np.float32(blk[0:2].view(np.float16)[0])
        qs = blk[bb - 16:]
        out += [d * table[qs & 15], d * table[qs >> 4]]
    return np.concatenate(out).reshape(raw.shape[0], -1)


@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.IQ4_NL, Q.IQ4_XS])
def test_lut4_keeps_the_file_blocks_and_dequantizes_exactly(qtype):
    raw = lut4_blocks(qtype)
    w = gq.to_lut4(raw, qtype)
    assert w.fmt == gq.LUT4_TYPES[qtype] and w.scale is None and w.zero is None
    assert w.q.data_ptr() == torch.from_numpy(raw).data_ptr()           # a view: native size, no copy
    assert w.shape == (4, 3 * gq.block_bytes(qtype)[0])
    ours = dequantize_int4(w).numpy()
    np.testing.assert_array_equal(ours, numpy_lut4(raw, qtype))
    np.testing.assert_array_equal(ours, quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype, bits", [(Q.MXFP4, 4.25), (Q.IQ4_NL, 4.5), (Q.IQ4_XS, 4.25)])
def test_lut4_packers_write_what_gguf_reads(qtype, bits):
    w = torch.randn(5, 512, generator=torch.Generator().manual_seed(1))
    raw = gq.quantize(w, qtype)
    assert raw.dtype == np.uint8 and raw.nbytes * 8 / w.numel() == bits
    back = quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(dequantize_int4(gq.to_lut4(raw, qtype)).numpy(), back)
    rel = float(np.linalg.norm(back - w.numpy()) / np.linalg.norm(w.numpy()))
    assert rel < (0.13 if qtype == Q.MXFP4 else 0.09)
    if qtype == Q.MXFP4:                                                   # gguf's own quantizer: same bytes
        np.testing.assert_array_equal(raw, quants.quantize(w.numpy(), qtype))


def test_native_format_only_for_one_lut4_type():
    assert gq.native_format({Q.MXFP4}) == "mxfp4" and gq.native_format({Q.IQ4_XS}) == "iq4_xs"
    assert gq.native_format({Q.MXFP4, Q.IQ4_NL}) is None and gq.native_format({Q.Q4_K}) is None
    with pytest.raises(ModelLoadError, match="not a 4-bit lookup type"):
        gq.to_lut4(random_blocks(Q.Q4_0), Q.Q4_0)
    with pytest.raises(ModelLoadError, match="17-byte blocks"):
        gq.to_lut4(np.zeros((2, 20), np.uint8), Q.MXFP4)
