"""cpu_moe (C++ extension and torch fallback) against a float64 per-token reference of the same weights.

Two extension paths: exact (act_quant=False: fp32 activations, matches to ~1e-7) and the int8-activation
path (act_quant=True). The latter is checked twice:
- tightly against a reference that quantizes x and h the same way (quantize_act: per 32-group, scale
  amax / 127, round half to even, in fp32): typically equal to ~4e-7, but h computed in fp32 vs float64 can
  land on the other side of a rounding boundary (one step = ~1e-3 of the max), hence 3e-3;
- against the exact reference at 2e-2 of the output's max: per-group int8 rounding errs <= scale / 2 per
  element (~0.4% of a group's max), which two quantized matmuls compound to ~0.5-1.3%.
A wrong scale, group, sign or permutation errs by O(1) and fails both.
"""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch

from hotexperts.config import KernelOptions, physical_cores
from hotexperts.errors import HotExpertsError
from hotexperts.kernels import cpu_moe as cm
from hotexperts.quant import (
    dequantize,
    int8g_from_int4g32,
    quantize_int4g32,
    quantize_int8,
    quantize_int8g,
    quantize_layer,
    quantize_lut4,
    quantize_q4_k,
)
from hotexperts.weights import LUT4_BLOCKS, ExpertAct, LayerExperts, QuantizedWeight

TOP_K = 4


def quantize_act(v: torch.Tensor) -> torch.Tensor:
    """v [..., K] fp32 -> what the kernel's int8 activations stand for (per 32-group, as quant32 does)."""
    g = v.float().unflatten(-1, (-1, 32))                            # [..., G, 32]
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(g * inv) * (amax / 127.0)).flatten(-2)


def reference(x, ids, weights, experts: LayerExperts, act_quant: bool = False, dq=None) -> torch.Tensor:
    """float64, one token and one expert at a time (act_quant: x and h quantized like the kernel does);
    dq: the layer's (w13, w2) already dequantized to float64."""
    aq = quantize_act if act_quant else (lambda v: v)
    w13, w2 = dq or (dequantize(experts.w13, torch.float64), dequantize(experts.w2, torch.float64))
    I = w2.shape[-1]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            gu = w13[e] @ aq(x[t].float()).double()
            if experts.b13 is not None:
                gu = gu + experts.b13[e].double()
            h = experts.act(gu[:I], gu[I:])                         # silu(g) * u unless a variant
            y[t] += float(weights[t, k]) * (w2[e] @ aq(h.float()).double())
    return y


def make_layer(fmt: str, gen: torch.Generator) -> LayerExperts:
    E = int(torch.randint(TOP_K, 17, (1,), generator=gen))
    unit = 256 if fmt == "q4_k" else 32                       # q4_k rows are whole 256-weight blocks
    D, I = (unit * int(torch.randint(1, 5 if unit == 32 else 3, (1,), generator=gen)) for _ in range(2))
    w13, w2 = torch.randn(E, 2 * I, D, generator=gen), torch.randn(E, D, I, generator=gen)
    layer = LayerExperts(w13 * 0.2, w2 * 0.2)
    if fmt in ("bf16", "fp16"):
        dt = torch.bfloat16 if fmt == "bf16" else torch.float16
        return LayerExperts(layer.w13.to(dt), layer.w2.to(dt))
    return quantize_layer(layer, "none" if fmt == "fp32" else fmt)


def routing(T: int, E: int, active: int, gen: torch.Generator):
    """ids [T, TOP_K] with exactly `active` distinct experts per row, the rest -1 at random positions."""
    ids = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(T)])
    for t in range(T):
        ids[t, torch.randperm(TOP_K, generator=gen)[active:]] = -1
    return ids, torch.rand(T, TOP_K, generator=gen)


def check(fn, T: int, fmt: str, seed: int, x_dtype=torch.float32, out_dtype=torch.float32, act_quant=None,
          layer: LayerExperts | None = None):
    """fn(x, ids, w, layer, out[, act_quant=]) for every number of active experts; act_quant True checks the
    int8-activation path (see the module docstring), False/None (torch fallback) the exact one.
    layer: a given one instead of make_layer(fmt)."""
    gen = torch.Generator().manual_seed(seed)
    layer = make_layer(fmt, gen) if layer is None else layer
    D = layer.w2.shape[1]
    x = torch.randn(T, D, generator=gen).to(x_dtype)
    kw = {} if act_quant is None else {"act_quant": act_quant}
    dq = dequantize(layer.w13, torch.float64), dequantize(layer.w2, torch.float64)
    for active in range(1, TOP_K + 1):
        ids, w = routing(T, layer.num_experts, active, gen)
        ref = reference(x, ids, w, layer, dq=dq)
        out = torch.full((T, D), float("nan"), dtype=out_dtype)        # written, not accumulated
        got = fn(x, ids, w, layer, out, **kw)
        assert got is out
        tol = 2e-5 if out_dtype == torch.float32 else 1e-2
        if act_quant:
            refq = reference(x, ids, w, layer, act_quant=True, dq=dq)   # h: an fp32-vs-fp64 rounding flip
            torch.testing.assert_close(out.double(), refq, rtol=tol, atol=3e-3 * refq.abs().max().item())
            tol = 2e-2
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


requires_ext = pytest.mark.skipif(cm.cpu_moe_backend() == "torch", reason="C++ extension unavailable")


@requires_ext
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16", "int8", "int4g32", "int8g32", "int8g16", "q4_k"])
@pytest.mark.parametrize("T", [1, 2, 7, 16, 64])
def test_extension_matches_reference(T, fmt):
    check(cm.cpu_moe, T, fmt, seed=T * 31 + len(fmt), act_quant=False)


requires_int = pytest.mark.skipif(cm.cpu_moe_int_dot() == "none", reason="no integer dot (needs AVX2)")
# int8gG weights take the integer path on AVX-512 VNNI builds only (elsewhere the exact one)
INT8G_INT = cm.cpu_moe_int_dot() == "avx512vnni"


def sized_layer(f13: str, f2: str, E: int, D: int, I: int, seed: int, scale_dtype=torch.float16,
                zero_dtype=None) -> LayerExperts:
    """A layer of a given shape; w13 and w2 in formats f13, f2 ("int8", "int4g32", "int8g32", "int8g16",
    "int8gGz" = int8gG with a zero, from int4g32, "q4_k", LUT4 "mxfp4" / "iq4_nl" / "iq4_xs", "fp32"); int4
    scale and zero dtypes may differ."""
    gen = torch.Generator().manual_seed(seed)

    def q(w, fmt):
        if fmt == "int8":
            return quantize_int8(w)
        if fmt == "q4_k":
            return quantize_q4_k(w)
        if fmt in LUT4_BLOCKS:
            return quantize_lut4(w, fmt)
        if fmt.startswith("int8g"):
            g = int(fmt[5:7])
            return int8g_from_int4g32(quantize_int4g32(w, scale_dtype), g) if fmt.endswith("z") else \
                quantize_int8g(w, g, scale_dtype)
        if fmt == "int4g32":
            qw = quantize_int4g32(w, scale_dtype)
            return QuantizedWeight(qw.fmt, qw.q, qw.scale, qw.zero.to(zero_dtype or scale_dtype))
        return w

    w13, w2 = torch.randn(E, 2 * I, D, generator=gen) * 0.2, torch.randn(E, D, I, generator=gen) * 0.2
    return LayerExperts(q(w13, f13), q(w2, f2))


# Shapes past the tests' small ones: 17 and 13 groups (a full 16-group chunk plus a tail chunk whose last
# block holds 1 group; int8 rows ending in a half 64-byte block), the model's own D = 2048, I = 768, an odd
# number of experts, mixed formats and scale/zero dtypes, T = 1..64 (token tiles of 1-4, experts with many
# tokens), -1 holes (check() routes 1..TOP_K active experts per token).
SHAPES = [("int4g32", "int4g32", 5, 544, 416), ("int8", "int8", 5, 544, 416), ("int4g32", "int8", 7, 544, 96),
          ("int8", "int4g32", 5, 96, 544), ("int4g32", "int4g32", 9, 2048, 768),
          ("int8", "int8", 9, 2048, 768), ("int8g16z", "int8g32", 5, 544, 416),
          ("int8g32z", "int8g16", 5, 96, 544), ("int8g32", "int8g16z", 9, 2048, 768),
          ("q4_k", "q4_k", 9, 2048, 768), ("q4_k", "int8g16z", 5, 512, 768), ("int4g32", "q4_k", 5, 544, 512),
          ("q4_k", "int8", 7, 1280, 256)]


@requires_int
@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("T", [1, 3, 64])
def test_int8_activation_path_sizes(shape, T):
    f13, f2, E, D, I = shape
    if "int8g" in f13 + f2 and not INT8G_INT:
        pytest.skip("int8gG integer path needs AVX-512 VNNI")
    layer = sized_layer(f13, f2, E, D, I, seed=T + D)
    check(cm.cpu_moe, T, f13, seed=T, act_quant=True, layer=layer)


@requires_ext
@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 5])
def test_exact_path_sizes(T):
    layer = sized_layer("int4g32", "int8", 5, 544, 416, seed=1)
    check(cm.cpu_moe, T, "int4g32", seed=T, act_quant=False, layer=layer)


@requires_int
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, None), (torch.float32, None),
                                    (torch.float32, torch.float16)], ids=["bf16", "fp32", "fp32-fp16"])
def test_int4_scale_dtypes(dtypes):
    sd, zd = dtypes
    layer = sized_layer("int4g32", "int4g32", 4, 544, 416, seed=2, scale_dtype=sd, zero_dtype=zd)
    check(cm.cpu_moe, 3, "int4g32", seed=4, act_quant=True, layer=layer)


@requires_int
def test_prefetch_distance_does_not_change_results():
    layer = sized_layer("int4g32", "int8", 6, 544, 416, seed=3)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 544, generator=gen)
    ids, w = routing(9, 6, 3, gen)
    outs = [cm.cpu_moe(x, ids, w, layer, act_quant=True, options=KernelOptions(prefetch_rows=n))
            for n in (0, 1, 2, 7, 100)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@requires_int
@pytest.mark.parametrize("fmt", ["int8", "int4g32", "int8g32", "int8g16", "q4_k"])
@pytest.mark.parametrize("T", [1, 2, 7, 16, 64])
def test_int8_activation_path(T, fmt):
    if fmt.startswith("int8g") and not INT8G_INT:
        pytest.skip("int8gG integer path needs AVX-512 VNNI")
    check(cm.cpu_moe, T, fmt, seed=T * 17 + len(fmt), act_quant=True)


@requires_int
def test_act_quant_default_and_switch():
    """Auto: int path for quantized weights (differs from exact), exact for bf16; the options' switch."""
    gen = torch.Generator().manual_seed(9)
    layer = make_layer("int4g32", gen)
    x = torch.randn(3, layer.w2.shape[1], generator=gen)
    ids, w = routing(3, layer.num_experts, 2, gen)
    exact = cm.cpu_moe(x, ids, w, layer, act_quant=False)
    assert not torch.equal(cm.cpu_moe(x, ids, w, layer), exact)
    assert torch.equal(cm.cpu_moe(x, ids, w, layer, options=KernelOptions(act_quant=False)), exact)
    bf = make_layer("bf16", torch.Generator().manual_seed(9))
    x = torch.randn(3, bf.w2.shape[1])
    ids, w = routing(3, bf.num_experts, 2, gen)
    assert torch.equal(cm.cpu_moe(x, ids, w, bf, act_quant=True), cm.cpu_moe(x, ids, w, bf, act_quant=False))


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4g32", "int8g16", "q4_k"])
@pytest.mark.parametrize("T", [1, 16])
def test_torch_fallback_matches_reference(T, fmt):
    check(cm.cpu_moe_torch, T, fmt, seed=T * 7 + len(fmt))


@requires_ext
@pytest.mark.parametrize("fmt", ["int8", "int4g32", "int8g32", "q4_k"])
@pytest.mark.parametrize("act_quant", [False, True])
def test_bf16_activations_and_output(fmt, act_quant):
    if act_quant and (cm.cpu_moe_int_dot() == "none" or (fmt == "int8g32" and not INT8G_INT)):
        pytest.skip("no integer dot")
    check(cm.cpu_moe, 5, fmt, seed=3, x_dtype=torch.bfloat16, out_dtype=torch.bfloat16, act_quant=act_quant)


@requires_ext
def test_no_active_expert_writes_zeros_and_bad_id_raises():
    layer = make_layer("int8", torch.Generator().manual_seed(0))
    D = layer.w2.shape[1]
    ids = torch.full((3, TOP_K), -1)
    out = cm.cpu_moe(torch.randn(3, D), ids, torch.rand(3, TOP_K), layer, torch.full((3, D), 7.0))
    assert torch.equal(out, torch.zeros(3, D))
    ids[1, 2] = layer.num_experts
    with pytest.raises(RuntimeError, match="out of range"):
        cm.cpu_moe(torch.randn(3, D), ids, torch.rand(3, TOP_K), layer)


def test_fallback_warns_once_and_is_correct(monkeypatch):
    monkeypatch.setattr(cm, "load_extension", lambda isa="native": None)
    monkeypatch.setattr(cm, "_warned", set())
    with pytest.warns(RuntimeWarning, match="torch fallback"):
        check(cm.cpu_moe, 3, "int8", seed=5)
    assert cm.cpu_moe_backend() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(cm.cpu_moe, 2, "int4g32", seed=6)


def test_unsupported_shape_falls_back(monkeypatch):
    monkeypatch.setattr(cm, "_warned", set())
    gen = torch.Generator().manual_seed(1)
    layer = LayerExperts(torch.randn(4, 2 * 24, 32, generator=gen), torch.randn(4, 32, 24, generator=gen))
    x, (ids, w) = torch.randn(2, 32, generator=gen), routing(2, 4, 2, gen)
    with pytest.warns(RuntimeWarning):
        out = cm.cpu_moe(x, ids, w, layer)
    # the torch fallback (oneDNN fp32) rounds differently per host: 2.5e-5 seen on the H200 machine
    torch.testing.assert_close(out.double(), reference(x, ids, w, layer), rtol=1e-4, atol=1e-4)


@requires_ext
def test_releases_gil():
    """While one thread is inside cpu_moe, another thread keeps running Python code."""
    gen = torch.Generator().manual_seed(2)
    E, D, I, T = 8, 512, 512, 64
    layer = LayerExperts(torch.randn(E, 2 * I, D, generator=gen), torch.randn(E, D, I, generator=gen))
    x = torch.randn(T, D, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen) for _ in range(T)])
    windows, ticks, done = [], [], threading.Event()

    def work():
        for _ in range(3):
            t0 = time.perf_counter()
            cm.cpu_moe(x, ids, torch.rand(T, E), layer, options=KernelOptions(cpu_threads=1))
            windows.append((t0, time.perf_counter()))
        done.set()

    th = threading.Thread(target=work)
    th.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    th.join()
    inside = sum(a < t < b for t in ticks for a, b in windows)
    assert inside > 10, f"main thread ran {inside} times during {len(windows)} calls"


def test_thread_setting():
    assert KernelOptions().threads() == physical_cores() >= 1
    assert KernelOptions().threads(beside_gpu=True) == max(1, physical_cores() - 1)
    assert KernelOptions(cpu_threads=3).threads(beside_gpu=True) == 3
    with pytest.raises(HotExpertsError, match="thread count must be >= 1"):
        KernelOptions(cpu_threads=0)


# The AVX2 (-mno-avx512f: the 256-bit integer kernels, AVX-VNNI or vpmaddubsw) and scalar (-mno-avx: the fp32
# path only) builds of the same source, on this machine; built on first use (~1-2 min each), then cached.
@requires_ext
@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
@pytest.mark.parametrize("shape", [("q4_k", "q4_k", 5, 512, 768), ("int4g32", "q4_k", 4, 544, 256),
                                   ("q4_k", "int8g16z", 4, 256, 512)], ids=lambda s: "-".join(map(str, s)))
def test_other_isa_builds(isa, shape):
    opt = KernelOptions(cpu_isa=isa)
    if cm.cpu_moe_backend(isa) == "torch":
        pytest.skip(f"the {isa} build is unavailable here")
    assert cm.cpu_moe_backend(isa) == f"ext-{isa}"
    f13, f2, E, D, I = shape
    layer = sized_layer(f13, f2, E, D, I, seed=D + I)

    def fn(x, ids, w, le, out, act_quant=None):
        return cm.cpu_moe(x, ids, w, le, out, act_quant=act_quant, options=opt)

    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # no fallback
        for T in (1, 6):
            check(fn, T, f13, seed=T, act_quant=False, layer=layer)
            if cm.cpu_moe_int_dot(isa) != "none" and "int8g" not in f2:   # AVX2: int8gG runs the fp32 path
                check(fn, T, f13, seed=T, act_quant=True, layer=layer)


@requires_ext
def test_native_worker_serves_q4_k_experts():
    """The decode mailbox's native thread (csrc/cpu_worker.cpp) takes q4_k weights (scale and zero None) and
    a Q4_K_M-like mix, and gives the direct kernel call's result."""
    from hotexperts.experts.mailbox import DecodeHandoff
    from hotexperts.experts.store import ExpertStore

    layers = {0: sized_layer("q4_k", "q4_k", 6, 256, 512, seed=1), 1: sized_layer("q4_k", "int8g16z", 6, 256,
                                                                                   512, seed=2)}
    store = ExpertStore(layers)
    h = DecodeHandoff(store, [0, 1], 2, 256, torch.float32, "cpu")
    try:
        h.self_test(torch.float32)
        x, ids, w = torch.randn(1, 256), torch.tensor([[4, 1]]), torch.tensor([[0.3, 0.7]])
        h.post(1, x, ids, w, None)
        got = h.collect(1, ids, None, None, torch.float32)
        torch.testing.assert_close(got, cm.cpu_moe(x, ids, w, layers[1]))
        h.take_step()
    finally:
        h.close()


# ---- 4-bit lookup formats (LUT4) and the activation / bias variants, on every extension path ----
# LUT4 shapes: 90 groups (gpt-oss's 2880 = 5 full 16-group chunks + a 10-group tail whose last block holds 2),
# 3 and 5 groups (a tail only), IQ4_XS rows of 256-weight blocks (24 groups: a chunk + an 8-group tail),
# LUT4 beside other formats.
LUT4_SHAPES = [("mxfp4", "mxfp4", 5, 2880, 160), ("mxfp4", "mxfp4", 4, 96, 2880),
               ("iq4_nl", "iq4_nl", 5, 544, 416), ("iq4_xs", "iq4_xs", 5, 768, 512),
               ("iq4_xs", "mxfp4", 4, 256, 96), ("int4g32", "iq4_nl", 4, 160, 544),
               ("mxfp4", "q4_k", 4, 160, 256)]
VARIANTS = [ExpertAct("swiglu_oai"), ExpertAct("gelu_tanh"), ExpertAct("swiglu_oai", alpha=1.2, limit=0.5)]


def with_variant(layer: LayerExperts, act: ExpertAct, seed: int, bias: bool = True) -> LayerExperts:
    b13 = torch.randn(layer.num_experts, layer.w13.shape[1], generator=torch.Generator().manual_seed(seed))
    return LayerExperts(layer.w13, layer.w2, b13 * 0.5 if bias else None, act)


@requires_ext
@pytest.mark.parametrize("shape", LUT4_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("T", [1, 6])
def test_lut4_exact_path(shape, T):
    f13, f2, E, D, I = shape
    layer = sized_layer(f13, f2, E, D, I, seed=D + I)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # the extension, no fallback
        check(cm.cpu_moe, T, f13, seed=T, act_quant=False, layer=layer)


@pytest.mark.skipif(not INT8G_INT, reason="the LUT4 integer path needs AVX-512 VNNI")
@pytest.mark.parametrize("shape", LUT4_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("T", [1, 3, 9])
def test_lut4_int8_activation_path(shape, T):
    f13, f2, E, D, I = shape
    layer = sized_layer(f13, f2, E, D, I, seed=D + I + 1)
    check(cm.cpu_moe, T, f13, seed=T, act_quant=True, layer=layer)


@requires_ext
@pytest.mark.parametrize("act", VARIANTS, ids=lambda a: f"{a.kind}-{a.limit}")
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int4g32", "q4_k", "mxfp4", "int8g32"])
@pytest.mark.parametrize("act_quant", [False, True])
def test_variants_match_reference(act, fmt, act_quant):
    """Clamped SwiGLU (limit 0.5 clamps most values: a missing clamp fails), GeLU-tanh, gate/up biases, on the
    exact and the integer paths: the extension itself (no fallback warning)."""
    layer = sized_layer(fmt, fmt, 6, 256, 512, seed=len(fmt)) if fmt != "bf16" else make_layer(
        "bf16", torch.Generator().manual_seed(2))
    layer = with_variant(layer, act, seed=3)
    quantized = isinstance(layer.w13, QuantizedWeight) and (fmt != "int8g32" or INT8G_INT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(cm.cpu_moe, 5, fmt, seed=7, act_quant=act_quant and quantized, layer=layer)


@requires_ext
def test_variant_without_bias_and_bias_matters():
    layer = sized_layer("int4g32", "int4g32", 4, 256, 256, seed=5)
    x, ids, w = torch.randn(3, 256), torch.tensor([[0, 1], [2, 3], [1, -1]]), torch.rand(3, 2)
    unbiased = with_variant(layer, ExpertAct("swiglu_oai"), 1, bias=False)
    plain = cm.cpu_moe(x, ids, w, unbiased, act_quant=False)
    biased = cm.cpu_moe(x, ids, w, with_variant(layer, ExpertAct("swiglu_oai"), 1), act_quant=False)
    ref = reference(x, ids, w, unbiased)
    torch.testing.assert_close(plain.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
    assert (plain - biased).abs().max() > 1e-2


def test_bad_bias_shape_is_a_clear_error():
    layer = sized_layer("fp32", "fp32", 4, 32, 32, seed=1)
    bad = LayerExperts(layer.w13, layer.w2, torch.zeros(4, 32), ExpertAct("swiglu_oai"))
    with pytest.raises(HotExpertsError, match=r"gate/up bias must be \[4, 64\]"):
        cm.act_args(bad)


def test_activation_aliases_and_codes():
    assert ExpertAct("clamped_swiglu").kind == "swiglu_oai" and ExpertAct("silu_glu").code == 0
    assert ExpertAct("gelu_tanh_glu").code == 2 and ExpertAct("swiglu_oai").code == 1
    with pytest.raises(ValueError, match="unknown expert activation"):
        ExpertAct("relu")


@requires_ext
def test_native_worker_serves_variants_and_lut4():
    """The decode mailbox's native thread takes GPT-OSS-style experts (MXFP4, clamped SwiGLU, biases): no
    HandoffUnavailable, the direct kernel call's result."""
    from hotexperts.experts.mailbox import DecodeHandoff
    from hotexperts.experts.store import ExpertStore

    oai, gelu = ExpertAct("swiglu_oai"), ExpertAct("gelu_tanh")
    layers = {0: with_variant(sized_layer("mxfp4", "mxfp4", 6, 2880, 160, seed=1), oai, 2),
              1: with_variant(sized_layer("iq4_nl", "mxfp4", 6, 2880, 160, seed=3), gelu, 4)}
    h = DecodeHandoff(ExpertStore(layers), [0, 1], 2, 2880, torch.float32, "cpu")
    try:
        h.self_test(torch.float32)
        for row, le in layers.items():
            x, ids, w = torch.randn(1, 2880), torch.tensor([[4, 1]]), torch.tensor([[0.3, 0.7]])
            h.post(row, x, ids, w, None)
            got = h.collect(row, ids, None, None, torch.float32)
            torch.testing.assert_close(got, cm.cpu_moe(x, ids, w, le))
        h.take_step()
    finally:
        h.close()
