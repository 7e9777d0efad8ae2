"""GGUF Q4_K experts load as "q4_k" (the file's bytes, no conversion) and give the same logits as gguf's own
dequantization of the file; Q4_0/Q4_1 (and Q4_K beside them) keep int4g32, Q4_K_M's mixed down matrices
int8g16. The tiny presets' rows (128) are shorter than a Q4_K block (the writer falls back to Q4_1), so these
tests build a test-local model with hidden and expert width 256."""

import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from hotexperts.engine import presets
from hotexperts.engine.gguf_export import write_gguf
from hotexperts.engine.load_gguf import load_gguf
from hotexperts.experts.reference import DenseExecutor
from hotexperts.loading import gguf_quants as gq
from hotexperts.loading.gguf_reader import GGUFFile
from hotexperts.weights import LayerExperts, QuantizedWeight

TEXT = "Hello world, café 日本 1234"


@pytest.fixture(scope="module")
def wide():
    """tiny-qwen3-moe with D = I = 256 (Q4_K rows are whole 256-weight blocks), 2 layers, 8 experts."""
    cfg = presets.preset_config("tiny-qwen3-moe")
    cfg.update({"hidden_size": 256, "moe_intermediate_size": 256, "num_hidden_layers": 2, "head_dim": 64,
                "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2})
    presets.PRESETS["q4k-wide"] = presets.Preset(cfg, presets.PRESETS["tiny-qwen3-moe"].tok, "test")
    try:
        return presets.build_in_memory("q4k-wide", dtype="float32", device="cpu")
    finally:
        del presets.PRESETS["q4k-wide"]


def logits(lm, layers=None):
    toks = torch.tensor(lm.tokenizer.encode(TEXT))
    layers = layers or {l: lm.store.layer(l) for l in lm.store.layers}
    with torch.inference_mode():
        return lm.model(toks, torch.arange(len(toks)), lm.model.new_kv_cache(64), DenseExecutor(layers))


def file_experts(path, cfg, convert) -> dict[int, LayerExperts]:
    """Every MoE layer's experts from the file's bytes through convert(raw, qtype) (w13 = gate then up)."""
    f = GGUFFile(path)

    def get(l, w):
        name = f"blk.{l}.ffn_{w}_exps.weight"
        return convert(np.asarray(f.raw(name)), f.info(name))

    def cat(a, b):
        if isinstance(a, torch.Tensor):
            return torch.cat([a, b], 1)
        return QuantizedWeight(a.fmt, torch.cat([a.q, b.q], 1), torch.cat([a.scale, b.scale], 1),
                               torch.cat([a.zero, b.zero], 1))

    return {l: LayerExperts(cat(get(l, "gate"), get(l, "up")), get(l, "down")) for l in cfg.moe_layers}


def gguf_dequantized(raw, info):
    """The gguf package's own dequantization (independent of ours)."""
    return torch.from_numpy(quants.dequantize(raw, info.qtype).reshape(info.shape)).float()


def test_q4_k_file_loads_as_q4_k(tmp_path, wide):
    path = write_gguf(wide, tmp_path / "m.gguf", "q4_k")[0]
    f = GGUFFile(path)
    assert f.info("blk.1.ffn_down_exps.weight").qtype == Q.Q4_K
    g = load_gguf(path, dtype="float32", device="cpu")
    E, I, D = g.cfg.num_experts, g.cfg.moe_intermediate_size, g.cfg.hidden_size
    for l in g.store.layers:
        le = g.store.layer(l)
        assert le.w13.fmt == le.w2.fmt == "q4_k" and le.w13.scale is None and le.w2.zero is None
        assert le.w13.q.shape == (E, 2 * I, D // 256 * 144) and le.w2.shape == (E, D, I)
        raw = lambda w, l=l: torch.from_numpy(np.array(f.raw(f"blk.{l}.ffn_{w}_exps.weight")))  # noqa: E731
        assert torch.equal(le.w13.q, torch.cat([raw("gate"), raw("up")], 1))   # the file's bytes
        assert torch.equal(le.w2.q, raw("down"))
        le.w2.q[0, 0, 0] += 1                                                  # owned memory, not the map
    assert g.store.expert_nbytes == 3 * I * D // 256 * 144                     # 4.5 bits per weight
    int4 = load_gguf(write_gguf(wide, tmp_path / "m4.gguf", "q4_1")[0], dtype="float32", device="cpu")
    assert int4.store.layer(0).w13.fmt == "int4g32"
    assert int4.store.expert_nbytes / g.store.expert_nbytes == 5 / 4.5         # 11% more experts per GB


def test_q4_k_logits_equal_gguf_dequantization_and_int4g32(tmp_path, wide):
    path = write_gguf(wide, tmp_path / "m.gguf", "q4_k")[0]
    g = load_gguf(path, dtype="float32", device="cpu")
    ref = logits(g, file_experts(path, g.cfg, gguf_dequantized))
    torch.testing.assert_close(logits(g), ref, rtol=0, atol=1e-5)           # exact weights
    exact = file_experts(path, g.cfg, lambda raw, info: gq.to_int4g32(raw, info.qtype, torch.float32))
    torch.testing.assert_close(logits(g, exact), ref, rtol=0, atol=1e-4)    # the int4g32 path: same numbers
    fp16 = file_experts(path, g.cfg, lambda raw, info: gq.to_int4g32(raw, info.qtype))
    torch.testing.assert_close(logits(g, fp16), ref, rtol=0, atol=2e-2)     # ... up to fp16 scale rounding


@pytest.mark.parametrize("quant,overrides,w13,w2", [
    ("q4_0", None, "int4g32", "int4g32"),
    ("q4_k", {"blk.1.ffn_down_exps.weight": "q4_0"}, "q4_k", "int4g32"),   # Q4_K beside Q4_0: int4g32
    ("q4_k_m", None, "q4_k", "int8g16"),                                  # Q4_K + Q6_K down: int8g16
])
def test_other_q4_files_keep_their_formats(tmp_path, wide, quant, overrides, w13, w2):
    path = write_gguf(wide, tmp_path / "m.gguf", quant, overrides=overrides)[0]
    g = load_gguf(path, dtype="float32", device="cpu")
    for l in g.store.layers:
        assert (g.store.layer(l).w13.fmt, g.store.layer(l).w2.fmt) == (w13, w2)
    ref = logits(g, file_experts(path, g.cfg, gguf_dequantized))
    torch.testing.assert_close(logits(g), ref, rtol=0, atol=2e-2)


def test_cpu_kernel_runs_the_loaded_q4_k_experts(tmp_path, wide):
    from hotexperts.kernels.cpu_moe import cpu_moe

    g = load_gguf(write_gguf(wide, tmp_path / "m.gguf", "q4_k")[0], dtype="float32", device="cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=gen)
    ids = torch.stack([torch.randperm(g.cfg.num_experts, generator=gen)[:g.cfg.top_k] for _ in range(5)])
    w = torch.rand(5, g.cfg.top_k, generator=gen)
    want = DenseExecutor({0: g.store.layer(0)})(0, x, ids, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # the torch fallback's warning, where no compiler
        exact = cpu_moe(x, ids, w, g.store.layer(0), act_quant=False)
        fast = cpu_moe(x, ids, w, g.store.layer(0))
    torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-5)
    assert (fast - want).abs().max() <= 2e-2 * want.abs().max()     # int8 activations (docs/cpu-kernel.md)
