"""gpu_moe: torch fallback vs a float64 reference; Triton kernels under the CPU interpreter (or on CUDA)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede the first triton import

from hotexperts.kernels.gpu_moe import gpu_moe, torch_moe  # noqa: E402
from hotexperts.weights import SILU, ExpertAct, QuantizedWeight  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, ids, weights, w13, w2, slot_of, act=SILU, b13=None):
    """Float64 loop over (t, k): the contract, written plainly (act, b13 [E, 2I] by expert id: a variant)."""
    T, K = ids.shape
    I = w13.shape[1] // 2
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            s = -1 if e < 0 else (e if slot_of is None else int(slot_of[e]))
            if s < 0:
                continue
            gu = w13[s].double() @ x[t].double()
            if b13 is not None:
                gu = gu + b13[e].double()
            h = act(gu[:I], gu[I:])
            out[t] += float(weights[t, k]) * (w2[s].double() @ h)
    return out


def make_case(T, K, E, S, D, I, dtype, seed, holes=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    w13 = (torch.randn(S, 2 * I, D, generator=g) / D**0.5).to(dtype)
    w2 = (torch.randn(S, D, I, generator=g) / I**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])      # [T, K] distinct
    weights = torch.rand(T, K, generator=g).to(dtype)
    slot_of = None
    if S != E or holes:
        slot_of = torch.full((E,), -1, dtype=torch.int32)
        res = torch.randperm(E, generator=g)[:S]
        slot_of[res] = torch.randperm(S, generator=g).to(torch.int32)
    if holes:
        ids[torch.rand(T, K, generator=g) < 0.2] = -1
    dev = [t.to(device) if t is not None else None for t in (x, ids, weights, w13, w2, slot_of)]
    return dev, (x, ids, weights, w13, w2, slot_of)


def rel_err(out, ref):
    return float((out.double().cpu() - ref).norm() / ref.norm().clamp(min=1e-12))


@pytest.mark.parametrize("mode", ["gather", "loop"])
@pytest.mark.parametrize("T,K", [(1, 1), (1, 8), (3, 2), (17, 4), (64, 8)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fallback_matches_reference(mode, T, K, dtype, tol):
    E, S, D, I = 12, 9, 24, 16
    args, cpu = make_case(T, K, E, S, D, I, dtype, seed=T * 10 + K)
    out = torch_moe(*args, mode=mode)
    assert out.dtype == dtype and out.shape == (T, D)
    assert rel_err(out, reference(*cpu)) < tol


def test_identity_map_and_out_buffer_written_not_accumulated():
    (x, ids, w, w13, w2, _), _ = make_case(5, 3, 6, 6, 16, 8, torch.float32, seed=1, holes=False)
    out = torch.full((5, 16), 7.0)
    res = gpu_moe(x, ids, w, w13, w2, None, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert rel_err(out, reference(x, ids, w, w13, w2, None)) < 1e-5


def test_holes_ignore_nan_slots_and_nan_weights():
    (x, ids, w, w13, w2, _), _ = make_case(4, 4, 8, 5, 16, 8, torch.float32, seed=2, holes=False)
    slot_of = torch.tensor([3, -1, 0, 1, -1, 2, -1, -1], dtype=torch.int32)   # slot 4 unmapped
    ids = torch.tensor([[0, 1, 2, 3], [5, 4, -1, 0], [-1, -1, -1, 2], [6, 7, 1, 4]])
    w[1, 2] = float("nan")                    # weight of a skipped pair must not leak
    w13[4] = float("nan")                     # an unmapped (e.g. being filled) slot must not be read
    w2[4] = float("nan")
    ref = reference(x, ids, w, w13, w2, slot_of)
    for mode in ("gather", "loop"):
        out = torch_moe(x, ids, w, w13, w2, slot_of, mode=mode)
        assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-5
    assert torch.count_nonzero(out[3]) == 0   # only non-resident experts


def test_all_pairs_skipped_gives_zero():
    (x, ids, w, w13, w2, slot_of), _ = make_case(3, 2, 6, 6, 16, 8, torch.float32, seed=3)
    ids.fill_(-1)
    assert torch.count_nonzero(gpu_moe(x, ids, w, w13, w2, slot_of)) == 0


def _quant_int8(w):
    scale = w.abs().amax(-1).clamp(min=1e-8) / 127
    return QuantizedWeight("int8", torch.round(w / scale.unsqueeze(-1)).to(torch.int8), scale)


def test_fallback_quantized_int8_and_int4():
    (x, ids, w, w13, w2, slot_of), _ = make_case(3, 2, 6, 4, 64, 32, torch.float32, seed=4)
    q13, q2 = _quant_int8(w13), _quant_int8(w2)
    dq = lambda q: q.q.float() * q.scale.unsqueeze(-1)  # noqa: E731
    ref = reference(x, ids, w, dq(q13), dq(q2), slot_of)
    assert rel_err(gpu_moe(x, ids, w, q13, q2, slot_of), ref) < 1e-5
    # int4g32: all nibbles 8+1 -> w = scale + zero per group; check against the stated formula
    q = torch.full((4, 64, 32), 0x99, dtype=torch.uint8)              # w13 [S, 2I, D/2]
    q13 = QuantizedWeight("int4g32", q, torch.full((4, 64, 2), 0.5), torch.full((4, 64, 2), 0.25))
    q2 = QuantizedWeight("int4g32", torch.full((4, 64, 16), 0x79, dtype=torch.uint8),
                         torch.ones(4, 64, 1), torch.zeros(4, 64, 1))   # low nibble 9 -> 1, high 7 -> -1
    d13 = torch.full((4, 64, 64), 0.75)
    d2 = torch.tensor([1.0, -1.0]).repeat(16).expand(4, 64, 32)
    ref = reference(x, ids, w, d13, d2, slot_of)
    assert rel_err(gpu_moe(x, ids, w, q13, q2, slot_of), ref) < 1e-5


def test_pool_ranks_copies_a_host_slot_list_without_a_temporary_pinned_source(monkeypatch):
    """A host `used` list reaches the device by a blocking copy: a non_blocking copy from a temporary pinned
    tensor reads memory freed when _pool_ranks returns (and, captured in a CUDA graph, on every replay)."""
    from types import SimpleNamespace

    from hotexperts.kernels import gpu_moe as gm

    async_copies, real_to = [], torch.Tensor.to

    def spy_to(self, *args, **kw):
        async_copies.append(bool(kw.get("non_blocking")))
        return real_to(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **kw: self)    # no CUDA here: as is
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    x = SimpleNamespace(is_cuda=True, device=torch.device("cpu"))                    # the CUDA branch
    ids, slot_of = torch.tensor([[0, 2], [3, -1]]), torch.tensor([1, -1, 0, 2], dtype=torch.int32)
    ranks, lists = gm._pool_ranks(x, ids, [(torch.empty(3, 4, 2), None, slot_of, {2, 0, 1})])
    assert not any(async_copies)
    assert lists[0].tolist() == [0, 1, 2] and ranks.tolist() == [[1, 0], [2, -1]]


# ------------------------------------------------------------------------- Triton (interpreter on CPU)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")


@pytest.fixture
def triton_moe():
    """The kernel module; skipped on CPU when it was imported before TRITON_INTERPRET was set."""
    from hotexperts.kernels import triton_moe as tm
    if DEV == "cpu" and type(tm._decode_down).__name__ != "InterpretedFunction":
        pytest.skip("triton_moe imported without TRITON_INTERPRET=1 in this process")
    return tm


@needs_triton
@pytest.mark.parametrize("T,K", [(1, 2), (3, 2)])
def test_triton_decode(T, K, triton_moe):
    args, cpu = make_case(T, K, 6, 4, 48, 24, torch.float32, seed=5 + T, device=DEV)
    cfg = {"BN": 16, "BK": 32, "BD": 16, "BI": 16, "num_warps": 4}    # uneven D, I: masked tails
    out = triton_moe.moe_decode(*args, cfg=cfg)
    assert rel_err(out, reference(*cpu)) < 1e-5


@needs_triton
def test_triton_prefill_grouped(triton_moe):
    args, cpu = make_case(9, 3, 6, 4, 48, 24, torch.float32, seed=7, device=DEV)
    cfg = {"BM": 16, "BN": 16, "BK": 16, "num_warps": 4, "num_stages": 1}
    out = triton_moe.moe_prefill(*args, cfg=cfg)
    assert rel_err(out, reference(*cpu)) < 5e-3          # tl.dot may use tf32 on GPU


def _quant_int4(w):
    """Random-free int4g32 of w [..., N, Kin]: per-group min/max; returns (QuantizedWeight, dequantized)."""
    grp = w.unflatten(-1, (-1, 32))                                    # [..., N, G, 32]
    lo, hi = grp.amin(-1), grp.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + 8 * scale                                              # w = (q - 8) * scale + zero
    q = torch.round((grp - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.uint8).flatten(-2)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)                        # low nibble = even column
    deq = ((q.float() - 8).unflatten(-1, (-1, 32)) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).flatten(-2)
    return QuantizedWeight("int4g32", packed, scale, zero), deq


def _quant_int8g(w, fmt):
    """int8gG of w: symmetric ("int8g32" / "int8g16") or with a zero ("...z", from int4g32); (qw, deq)."""
    from hotexperts.quant import dequantize, int8g_from_int4g32, quantize_int8g

    g = int(fmt[5:7])
    if fmt.endswith("z"):
        qw = int8g_from_int4g32(_quant_int4(w)[0], g)
    else:
        qw = quantize_int8g(w, g, torch.float32)
    return qw, dequantize(qw)


@needs_triton
@pytest.mark.parametrize("fmt", ["int8", "int4g32", "int8g32", "int8g16", "int8g16z"])
def test_triton_decode_quantized(fmt, triton_moe):
    (x, ids, w, w13, w2, slot_of), _ = make_case(1, 3, 6, 4, 96, 32, torch.float32, seed=9)
    if fmt == "int8":
        q13, q2 = _quant_int8(w13), _quant_int8(w2)
        d13, d2 = (q.q.float() * q.scale.unsqueeze(-1) for q in (q13, q2))
    elif fmt.startswith("int8g"):
        (q13, d13), (q2, d2) = _quant_int8g(w13, fmt), _quant_int8g(w2, fmt)
    else:
        (q13, d13), (q2, d2) = _quant_int4(w13), _quant_int4(w2)
    ref = reference(x, ids, w, d13, d2, slot_of)
    cfg = {"BN": 16, "BK": 32, "BD": 16, "BI": 32, "num_warps": 4}    # int4: BK doubled -> 64, tail masked
    out = triton_moe.moe_decode(*(t.to(DEV) for t in (x, ids, w, q13, q2, slot_of)), cfg=cfg)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(gpu_moe(x, ids, w, q13, q2, slot_of), ref) < 1e-5  # fallback agrees


@needs_triton
def test_align_by_slot_layout(triton_moe):
    align_by_slot = triton_moe.align_by_slot
    slot = torch.tensor([2, -1, 0, 2, 2, 0, -1, 3])
    pair_ids, block_slot = align_by_slot(slot, S=4, BM=2)
    assert block_slot.tolist() == [0, 2, 2, 3, -1, -1, -1, -1, -1, -1][: block_slot.numel()]
    assert pair_ids[:8].tolist() == [2, 5, 0, 3, 4, 8, 7, 8]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T,K", [(1, 8), (4, 8), (64, 8)])
def test_gpu_moe_cuda_bf16(T, K):
    args, cpu = make_case(T, K, 32, 16, 256, 128, torch.bfloat16, seed=11, device="cuda")
    assert rel_err(gpu_moe(*args), reference(*cpu)) < 2e-2


@needs_triton
@pytest.mark.parametrize("fmt", ["int4g32", "int8g16z"])
def test_quantized_prompt_batch_dequantizes_in_chunks(triton_moe, fmt):
    from hotexperts.kernels.gpu_moe import dequant_chunks_moe

    (x, ids, w, w13, w2, slot_of), _ = make_case(9, 3, 6, 5, 64, 32, torch.float32, seed=11)
    quant = _quant_int4 if fmt == "int4g32" else lambda t: _quant_int8g(t, fmt)
    (q13, d13), (q2, d2) = quant(w13), quant(w2)
    ref = reference(x, ids, w, d13, d2, slot_of)
    x, ids, w, q13, q2, slot_of = (t.to(DEV) for t in (x, ids, w, q13, q2, slot_of))   # CUDA: on the GPU
    out = torch.full_like(x, float("nan"))
    dequant_chunks_moe(x, ids, w, q13, q2, slot_of, out, chunk=2)     # 3 chunks over the used slots
    assert rel_err(out, ref) < 5e-3                                   # tl.dot may use tf32 on GPU
    hinted = dequant_chunks_moe(x, ids, w, q13, q2, slot_of, chunk=2, used=list(range(5)))   # host list
    torch.testing.assert_close(hinted, out)


@needs_triton
@pytest.mark.parametrize("chunk", [1, 2, 4, 100])
def test_two_pools_in_one_pass_equal_the_sum_of_their_parts(triton_moe, chunk):
    """Resident slots and a staging pool (disjoint experts) in one dequantized pass; chunks straddle both."""
    from hotexperts.kernels.gpu_moe import dequant_chunks_moe

    (x, ids, w, w13, w2, _), _ = make_case(9, 3, 6, 6, 64, 32, torch.float32, seed=5)
    (q13, d13), (q2, d2) = _quant_int4(w13), _quant_int4(w2)       # 6 experts, also the staging pool
    res = torch.tensor([2, -1, 0, -1, 1, -1], dtype=torch.int32)   # experts 0, 2, 4 in slots 2, 0, 1
    stage = torch.tensor([-1, 1, -1, 3, -1, 5], dtype=torch.int32)  # experts 1, 3, 5 staged at their index
    sl13, sl2 = q13[torch.tensor([2, 4, 0])], q2[torch.tensor([2, 4, 0])]   # slot s holds that expert
    ref = reference(x, ids, w, d13, d2, None)
    x, ids, w, q13, q2, sl13, sl2, res, stage = (t.to(DEV) for t in (x, ids, w, q13, q2, sl13, sl2, res,
                                                                     stage))
    got = dequant_chunks_moe(x, ids, w, sl13, sl2, res, chunk=chunk, used=[0, 1, 2],
                             more=((q13, q2, stage, [1, 3, 5]),))
    assert rel_err(got, ref) < 5e-3
    only = dequant_chunks_moe(x, ids, w, sl13, sl2, res, chunk=4, used=[0, 1, 2])
    part = dequant_chunks_moe(x, ids, w, q13, q2, stage, chunk=4, used=[1, 3, 5])
    torch.testing.assert_close(got, only + part, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("fmt", ["int4g32", "int8", "int8g32", "int8g16z"])
def test_triton_dequant_matches_the_reference_bit_for_bit(triton_moe, fmt):
    from hotexperts.kernels.triton_dequant import dequant_slots
    from hotexperts.quant import dequantize, quantize_int4g32, quantize_int8

    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 48, 96, generator=g)                  # 48 rows (not a multiple of the row block)
    if fmt.startswith("int8g"):             # fp16 scale/zero (as loaded): q * scale is exact, so FMA agrees
        qw = _quant_int8g(w, fmt)[0]
        qw = QuantizedWeight(qw.fmt, qw.q, qw.scale.half(), None if qw.zero is None else qw.zero.half())
    else:
        qw = (quantize_int4g32 if fmt == "int4g32" else quantize_int8)(w)
    qw = QuantizedWeight(qw.fmt, *(t.to(DEV) if t is not None else None for t in (qw.q, qw.scale, qw.zero)))
    idx = torch.tensor([4, 0, 2], device=DEV)
    for dtype in (torch.float32, torch.bfloat16):
        got = dequant_slots(qw, idx, dtype).cpu()
        want = dequantize(qw[idx.cpu()].to("cpu"), torch.float32).to(dtype)
        if dtype == torch.float32 or DEV == "cuda":
            assert torch.equal(got, want)
        else:                                     # the CPU interpreter's bf16 cast does not round to nearest
            torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    assert dequant_slots(qw, idx[:0], torch.float32).shape == (0, 48, 96)


# ------------------------------------------------------------------------- q4_k (GGUF Q4_K blocks in place)
def _quant_q4k(w):
    """q4_k of w [S, N, K] (K a multiple of 256) and its exact dequantization."""
    from hotexperts.quant import dequantize, quantize_q4_k

    qw = quantize_q4_k(w)
    return qw, dequantize(qw)


@needs_triton
@pytest.mark.parametrize("T,K,D,I", [(1, 3, 512, 256), (2, 2, 256, 768)])
@pytest.mark.parametrize("cfg", [None, {"BN": 16, "BK": 32, "BD": 16, "BI": 32, "num_warps": 4, "stages": 2,
                                        "NB_A": 4, "NB_B": 2}], ids=["default", "masked-blocks"])
def test_triton_decode_q4_k(triton_moe, T, K, D, I, cfg):
    """Kernels A and B read q4_k slots in place; NB blocks per step past a row's end are masked (I = 768 is
    3 blocks: NB_B = 2 and the default 4 both leave a masked block)."""
    (x, ids, w, w13, w2, slot_of), _ = make_case(T, K, 6, 4, D, I, torch.float32, seed=9 + T)
    (q13, d13), (q2, d2) = _quant_q4k(w13), _quant_q4k(w2)
    ref = reference(x, ids, w, d13, d2, slot_of)
    out = triton_moe.moe_decode(*(t.to(DEV) for t in (x, ids, w, q13, q2, slot_of)), cfg=cfg)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(gpu_moe(x, ids, w, q13, q2, slot_of), ref) < 1e-5   # torch fallback agrees


@needs_triton
def test_triton_decode_q4_k_beside_int8g16(triton_moe):
    """A Q4_K_M file: w13 q4_k, w2 int8g16 with a zero (each kernel its own format)."""
    (x, ids, w, w13, w2, slot_of), _ = make_case(1, 2, 6, 4, 256, 256, torch.float32, seed=12)
    (q13, d13), (q2, d2) = _quant_q4k(w13), _quant_int8g(w2, "int8g16z")
    out = triton_moe.moe_decode(*(t.to(DEV) for t in (x, ids, w, q13, q2, slot_of)))
    assert rel_err(out, reference(x, ids, w, d13, d2, slot_of)) < 1e-5


@needs_triton
def test_triton_dequant_q4_k_bit_for_bit(triton_moe):
    from hotexperts.kernels.triton_dequant import dequant_slots
    from hotexperts.quant import dequantize

    g = torch.Generator().manual_seed(4)
    raw = torch.randint(0, 256, (5, 12, 3, 144), dtype=torch.uint8, generator=g)      # arbitrary blocks
    raw[..., :4] = (torch.randn(5, 12, 3, 2, generator=g) * 0.01).half().view(torch.uint8)
    for qw in (_quant_q4k(torch.randn(5, 48, 512, generator=g))[0], QuantizedWeight("q4_k", raw.flatten(-2),
                                                                                     None)):
        idx = torch.tensor([4, 0, 2], device=DEV)
        want = dequantize(qw[idx.cpu()])
        qd = QuantizedWeight("q4_k", qw.q.to(DEV), None)
        for block in (None, (4, 256, 4), (16, 1024, 4)):              # 1, 2 (default), 4 blocks per step
            assert torch.equal(dequant_slots(qd, idx, torch.float32, block=block).cpu(), want)
        if DEV == "cuda":
            assert torch.equal(dequant_slots(qd, idx, torch.bfloat16).cpu(), want.bfloat16())


@needs_triton
def test_quantized_prompt_batch_q4_k(triton_moe):
    from hotexperts.kernels.gpu_moe import dequant_chunks_moe

    (x, ids, w, w13, w2, slot_of), _ = make_case(9, 3, 6, 5, 256, 256, torch.float32, seed=13)
    (q13, d13), (q2, d2) = _quant_q4k(w13), _quant_q4k(w2)
    ref = reference(x, ids, w, d13, d2, slot_of)
    x, ids, w, q13, q2, slot_of = (t.to(DEV) for t in (x, ids, w, q13, q2, slot_of))
    out = dequant_chunks_moe(x, ids, w, q13, q2, slot_of, chunk=2)
    assert rel_err(out, ref) < 5e-3                                   # tl.dot may use tf32 on GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 2, 64])
def test_gpu_moe_cuda_q4_k(T):
    """q4_k slots of the Qwen3-30B-A3B expert shape on CUDA, bf16 activations: the auto path (T = 1: decode
    GEMV; T = 64: slots dequantized in chunks for the grouped GEMM) and the decode kernels at T = 2."""
    from hotexperts.kernels import triton_moe

    (x, ids, w, w13, w2, slot_of), _ = make_case(T, 8, 32, 16, 2048, 768, torch.float32, seed=14)
    (q13, d13), (q2, d2) = _quant_q4k(w13), _quant_q4k(w2)
    ref = reference(x, ids, w, d13, d2, slot_of)
    args = [t.to("cuda") for t in (x.bfloat16(), ids, w.bfloat16(), q13, q2, slot_of)]
    assert rel_err(gpu_moe(*args), ref) < 2e-2
    assert rel_err(triton_moe.moe_decode(*args), ref) < 2e-2



# ---------------------------------------------------------------- LUT4 slots and activation / bias variants
def _quant_lut4(w, fmt):
    from hotexperts.quant import dequantize, quantize_lut4

    qw = quantize_lut4(w, fmt)
    return qw, dequantize(qw)


VARIANTS = [ExpertAct("swiglu_oai"), ExpertAct("gelu_tanh"), ExpertAct("swiglu_oai", alpha=1.2, limit=0.5)]


def _bias(E, I, seed):
    return torch.randn(E, 2 * I, generator=torch.Generator().manual_seed(seed)) * 0.5


@needs_triton
@pytest.mark.parametrize("fmt,D,I", [("mxfp4", 96, 64), ("iq4_nl", 64, 160), ("iq4_xs", 256, 256)])
@pytest.mark.parametrize("T,K", [(1, 3), (2, 2)])
def test_triton_decode_lut4(triton_moe, fmt, D, I, T, K):
    """LUT4 slots read in place by the decode GEMV (tails: 3 and 5 groups, one IQ4_XS super-block)."""
    (x, ids, w, w13, w2, slot_of), _ = make_case(T, K, 6, 5, D, I, torch.float32, seed=D + T)
    (q13, d13), (q2, d2) = _quant_lut4(w13, fmt), _quant_lut4(w2, fmt)
    ref = reference(x, ids, w, d13, d2, slot_of)
    args = [t.to(DEV) for t in (x, ids, w, q13, q2, slot_of)]
    cfg = {"BN": 16, "BK": 64, "BD": 16, "BI": 64, "num_warps": 4, "stages": 2}
    assert rel_err(triton_moe.moe_decode(*args, cfg=cfg), ref) < 1e-5
    assert rel_err(triton_moe.moe_decode(*args), ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("fmt", ["mxfp4", "iq4_nl", "iq4_xs"])
def test_triton_dequant_lut4_bit_for_bit(triton_moe, fmt):
    from hotexperts.kernels.triton_dequant import dequant_slots
    from hotexperts.quant import dequantize

    w = torch.randn(5, 24, 512, generator=torch.Generator().manual_seed(2))
    qw = _quant_lut4(w, fmt)[0].to(DEV)
    idx = torch.tensor([4, 0, 2], device=DEV)
    want = dequantize(qw.to("cpu")[idx.cpu()])
    for block in (None, (8, 64, 4)):
        assert torch.equal(dequant_slots(qw, idx, torch.float32, block=block).cpu(), want)


@needs_triton
@pytest.mark.parametrize("act", VARIANTS, ids=lambda a: f"{a.kind}-{a.limit}")
@pytest.mark.parametrize("bias", [True, False])
def test_triton_variants_decode_and_prefill(triton_moe, act, bias):
    """Clamped SwiGLU (limit 0.5 clamps most values), GeLU-tanh and gate/up biases (by expert id, not slot)
    in the epilogue of the decode GEMV and of the grouped prompt GEMM."""
    (x, ids, w, w13, w2, slot_of), _ = make_case(9, 3, 6, 5, 48, 24, torch.float32, seed=3)
    b13 = _bias(6, 24, 4) if bias else None
    dev = [t.to(DEV) for t in (x, ids, w, w13, w2, slot_of)]
    db = None if b13 is None else b13.to(DEV)
    for T in (1, 9):
        ref = reference(x[:T], ids[:T], w[:T], w13, w2, slot_of, act, b13)
        args = [dev[0][:T], dev[1][:T], dev[2][:T], *dev[3:]]
        got = triton_moe.moe_decode(*args, act=act, b13=db)
        assert rel_err(got, ref) < 1e-5
        cfg = {"BM": 16, "BN": 16, "BK": 16, "num_warps": 4, "num_stages": 1}
        assert rel_err(triton_moe.moe_prefill(*args, cfg=cfg, act=act, b13=db), ref) < 5e-3


@needs_triton
@pytest.mark.parametrize("fmt", ["mxfp4", "int4g32"])
def test_variant_prompt_batch_over_quantized_slots(triton_moe, fmt):
    """GPT-OSS-style experts (clamped SwiGLU + biases) over quantized slots: dequantized chunks + grouped
    GEMM,
    and gpu_moe on the Triton backend (no torch fallback for variants any more)."""
    from hotexperts.kernels.gpu_moe import dequant_chunks_moe

    (x, ids, w, w13, w2, slot_of), _ = make_case(9, 3, 6, 5, 64, 64, torch.float32, seed=8)
    (q13, d13), (q2, d2) = _quant_lut4(w13, fmt) if fmt != "int4g32" else _quant_int4(w13), \
        _quant_lut4(w2, fmt) if fmt != "int4g32" else _quant_int4(w2)
    act, b13 = ExpertAct("swiglu_oai", limit=1.0), _bias(6, 64, 9)
    ref = reference(x, ids, w, d13, d2, slot_of, act, b13)
    x, ids, w, q13, q2, slot_of, b13 = (t.to(DEV) for t in (x, ids, w, q13, q2, slot_of, b13))
    out = dequant_chunks_moe(x, ids, w, q13, q2, slot_of, chunk=2, act=act, b13=b13)
    assert rel_err(out, ref) < 5e-3
    dec = gpu_moe(x[:1], ids[:1], w[:1], q13, q2, slot_of, backend="triton", act=act, b13=b13)
    assert rel_err(dec, reference(*(t.cpu() if t is not None else None for t in (x[:1], ids[:1], w[:1])),
                                  d13, d2, slot_of.cpu(), act, b13.cpu())) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["mxfp4", "iq4_nl"])
@pytest.mark.parametrize("T", [1, 2, 64])
def test_gpu_moe_cuda_gpt_oss_shape_lut4(fmt, T):
    """The gpt-oss expert shape (D = I = 2880, top-4) in LUT4 slots with the clamped SwiGLU and biases on
    CUDA,
    bf16 activations: decode GEMV (T = 1, 2) and dequantized chunks + grouped GEMM (T = 64)."""
    from hotexperts.kernels import triton_moe

    (x, ids, w, w13, w2, slot_of), _ = make_case(T, 4, 32, 16, 2880, 2880, torch.float32, seed=15)
    (q13, d13), (q2, d2) = _quant_lut4(w13, fmt), _quant_lut4(w2, fmt)
    act, b13 = ExpertAct("swiglu_oai"), _bias(32, 2880, 16)
    ref = reference(x, ids, w, d13, d2, slot_of, act, b13)
    args = [t.to("cuda") for t in (x.bfloat16(), ids, w.bfloat16(), q13, q2, slot_of)]
    kw = {"act": act, "b13": b13.cuda()}
    assert rel_err(gpu_moe(*args, **kw), ref) < 2e-2
    assert rel_err(triton_moe.moe_decode(*args, **kw), ref) < 2e-2
