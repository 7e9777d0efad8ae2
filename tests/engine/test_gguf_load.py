"""load_gguf / write_gguf: round trips for the four architectures, experts kept as exact int4g32, logits equal
to the same (independently dequantized) weights on the reference path, split files, one clear error each."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

from hotexperts.engine import gguf_export, presets
from hotexperts.engine.gguf_export import write_gguf
from hotexperts.engine.load_gguf import load_gguf
from hotexperts.errors import ModelLoadError, UnsupportedArchitectureError
from hotexperts.experts.reference import DenseExecutor
from hotexperts.loading.gguf_reader import GGUFFile
from hotexperts.models import get_arch
from hotexperts.quant import dequantize
from hotexperts.weights import LayerExperts, QuantizedWeight

TINY = ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral", "tiny-olmoe"]
TEXT = "Hello world, café 日本 1234"


def build(preset: str, wide: bool = False):
    """A preset in float32; wide=True: hidden and expert width 256 (Q4_K needs 256-weight rows), 2 layers."""
    if not wide:
        return presets.build_in_memory(preset, dtype="float32", device="cpu")
    cfg = presets.preset_config(preset)
    width = "moe_intermediate_size" if "qwen" in preset else "intermediate_size"
    experts = "num_local_experts" if preset == "tiny-mixtral" else "num_experts"
    cfg.update({"hidden_size": 256, width: 256, "num_hidden_layers": 2, "head_dim": 64,
                "num_attention_heads": 4, experts: 8, "num_experts_per_tok": 2})
    if "shared_expert_intermediate_size" in cfg:
        cfg["shared_expert_intermediate_size"] = 256
    name = f"wide-{preset}"
    presets.PRESETS[name] = presets.Preset(cfg, presets.PRESETS[preset].tok, "test")
    try:
        return presets.build_in_memory(name, dtype="float32", device="cpu")
    finally:
        del presets.PRESETS[name]


def logits(lm, layers=None):
    toks = torch.tensor(lm.tokenizer.encode(TEXT))
    layers = layers or {l: lm.store.layer(l) for l in lm.store.layers}
    with torch.inference_mode():
        return lm.model(toks, torch.arange(len(toks)), lm.model.new_kv_cache(64), DenseExecutor(layers))


def reference_experts(path, cfg) -> dict[int, LayerExperts]:
    """The GGUF's experts dequantized by the gguf package itself (independent of our conversion)."""
    f = GGUFFile(path)

    def deq(name):
        t = f.info(name)
        return torch.from_numpy(quants.dequantize(np.asarray(f.raw(name)), t.qtype).reshape(t.shape)).float()

    return {l: LayerExperts(torch.cat([deq(f"blk.{l}.ffn_{w}_exps.weight") for w in ("gate", "up")], 1),
                            deq(f"blk.{l}.ffn_down_exps.weight")) for l in cfg.moe_layers}


@pytest.mark.parametrize("preset", TINY)
def test_roundtrip_every_arch(tmp_path, preset):
    lm = build(preset)
    path = write_gguf(lm, tmp_path / "m.gguf", "q8_0")[0]
    g = load_gguf(path, dtype="float32", device="cpu")
    assert g.cfg == lm.cfg
    sd = g.model.state_dict()
    for k, v in lm.model.state_dict().items():                # f32 dense: exact (Mixtral Q/K un-permuted)
        assert torch.equal(sd[k], v), k
    le, ref = g.store.layer(0), lm.store.layer(0)
    assert isinstance(le.w13, QuantizedWeight) and le.w13.fmt == "int8g32" and le.w13.zero is None   # Q8_0
    d13, d2 = dequantize(le.w13), dequantize(le.w2)
    assert (d13 - ref.w13).abs().max() < 0.02 and (d2 - ref.w2).abs().max() < 0.01
    assert g.tokenizer.encode(TEXT) == lm.tokenizer.encode(TEXT)
    assert g.tokenizer.chat_template == lm.tokenizer.chat_template
    assert g.tokenizer.eos_ids == lm.tokenizer.eos_ids
    torch.testing.assert_close(logits(g), logits(g, reference_experts(path, g.cfg)), rtol=0, atol=1e-5)


def test_mixtral_sliding_window_survives_the_file(tmp_path):
    lm = build("tiny-mixtral")
    lm.cfg = dataclasses.replace(lm.cfg, sliding_window=5)
    g = load_gguf(write_gguf(lm, tmp_path / "m.gguf", "q8_0")[0], dtype="float32", device="cpu")
    assert g.cfg.sliding_window == 5 and g.cfg == lm.cfg


def test_mixtral_qk_rows_are_permuted_in_the_file(tmp_path):
    lm = build("tiny-mixtral")
    path = write_gguf(lm, tmp_path / "m.gguf", "q8_0")[0]
    f = GGUFFile(path)
    q = lm.model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    raw = torch.from_numpy(np.array(f.raw("blk.0.attn_q.weight")))
    H, hd = lm.cfg.num_heads, lm.cfg.head_dim
    # llama.cpp layout: per head, row pairs (i, i + hd/2) interleaved
    want = q.reshape(H, 2, hd // 2, -1).transpose(1, 2).reshape(q.shape)
    assert torch.equal(raw, want) and not torch.equal(raw, q)


@pytest.mark.parametrize("quant,preset", [("q4_1", "tiny-qwen3-moe"), ("q4_0", "tiny-qwen2-moe"),
                                          ("q4_1", "tiny-olmoe"), ("q4_0", "tiny-mixtral")])   # Q4_K: q4_k
def test_q4_experts_stay_int4g32(tmp_path, quant, preset):
    lm = build(preset, wide=True)
    path = write_gguf(lm, tmp_path / "m.gguf", quant)[0]
    assert GGUFFile(path).info("blk.0.ffn_down_exps.weight").qtype == Q[quant.upper()]
    exact = load_gguf(path, dtype="float32", device="cpu", expert_scale_dtype="float32")
    fast = load_gguf(path, dtype="float32", device="cpu")
    le = fast.store.layer(0)
    E, I, D = lm.cfg.num_experts, lm.cfg.moe_intermediate_size, lm.cfg.hidden_size
    assert isinstance(le.w13, QuantizedWeight) and le.w13.fmt == "int4g32" and le.w2.fmt == "int4g32"
    assert le.w13.q.shape == (E, 2 * I, D // 2) and le.w2.scale.shape == (E, D, I // 32)
    assert fast.store.expert_nbytes == 3 * I * D // 2 + 3 * I * D // 32 * 4     # 5 bits per weight
    ref = logits(exact, reference_experts(path, exact.cfg))
    torch.testing.assert_close(logits(exact), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(fast), ref, rtol=0, atol=2e-2)


def test_cpu_kernel_runs_the_quantized_experts(tmp_path):
    from hotexperts.kernels.cpu_moe import cpu_moe

    lm = build("tiny-qwen3-moe", wide=True)
    g = load_gguf(write_gguf(lm, tmp_path / "m.gguf", "q4_k")[0], dtype="float32", device="cpu")
    x = torch.randn(5, 256)
    ids = torch.randint(0, g.cfg.num_experts, (5, g.cfg.top_k))
    w = torch.rand(5, g.cfg.top_k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = cpu_moe(x, ids, w, g.store.layer(0))
    want = DenseExecutor({0: g.store.layer(0)})(0, x, ids, w)
    # the kernel may quantize activations to int8 (docs/cpu-kernel.md): ~1% of the output scale
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.parametrize("quant,fmt,zero", [("q8_0", "int8g32", False), ("q6_k", "int8g16", False),
                                            ("q5_k", "int8g32", True), ("q5_0", "int8g32", False),
                                            ("q5_1", "int8g32", True)])   # mxfp4: native LUT4 (tests/loading)
def test_5_6_8_bit_experts_stay_int8g(tmp_path, quant, fmt, zero):
    lm = build("tiny-qwen2-moe", wide=True)
    path = write_gguf(lm, tmp_path / "m.gguf", quant)[0]
    assert GGUFFile(path).info("blk.0.ffn_down_exps.weight").qtype == Q[quant.upper()]
    exact = load_gguf(path, dtype="float32", device="cpu", expert_scale_dtype="float32")
    g = load_gguf(path, dtype="float32", device="cpu")
    le = g.store.layer(0)
    E, I, D = lm.cfg.num_experts, lm.cfg.moe_intermediate_size, lm.cfg.hidden_size
    G = int(fmt[5:])
    assert le.w13.fmt == fmt and le.w2.fmt == fmt and (le.w2.zero is not None) == zero
    assert le.w13.q.shape == (E, 2 * I, D) and le.w13.q.dtype == torch.int8
    assert g.store.expert_nbytes == 3 * I * D + 3 * I * D // G * 2 * (2 if zero else 1)
    assert le.w2.scale.dtype == torch.float16
    ref = logits(exact, reference_experts(path, exact.cfg))
    torch.testing.assert_close(logits(exact), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(g), ref, rtol=0, atol=2e-2)


@pytest.mark.parametrize("quant", ["bf16", "f16"])
def test_other_types_are_dequantized(tmp_path, quant):
    lm = build("tiny-qwen2-moe", wide=True)
    path = write_gguf(lm, tmp_path / "m.gguf", quant, dense="bf16")[0]
    g = load_gguf(path, dtype="float32", device="cpu")
    le = g.store.layer(0)
    assert isinstance(le.w13, torch.Tensor) and le.w13.dtype == torch.float32
    torch.testing.assert_close(logits(g), logits(g, reference_experts(path, g.cfg)), rtol=0, atol=1e-5)
    assert load_gguf(path, device="cpu").store.layer(0).w2.dtype == torch.bfloat16    # the model dtype


def test_q4_k_m_overrides_follow_llama_cpp():
    assert sorted(int(k.split(".")[1]) for k in gguf_export.q4_k_m_overrides(48)) == \
        [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47]


def test_q4_k_m_mix_keeps_every_matrix_quantized(tmp_path):
    """Q4_K_M-like: Q6_K down in one layer, Q4_K elsewhere -> w2 is int8g16 (with zero) in every layer,
    exact for both types; w13 (Q4_K in every layer) stays q4_k."""
    lm = build("tiny-qwen3-moe", wide=True)
    path = write_gguf(lm, tmp_path / "m.gguf", "q4_k_m")[0]             # 2 layers: layer 1's down is Q6_K
    f = GGUFFile(path)
    assert [f.info(f"blk.{l}.ffn_down_exps.weight").qtype for l in (0, 1)] == [Q.Q4_K, Q.Q6_K]
    assert f.info("blk.1.ffn_gate_exps.weight").qtype == Q.Q4_K
    exact = load_gguf(path, dtype="float32", device="cpu", expert_scale_dtype="float32")
    for l in exact.store.layers:
        le = exact.store.layer(l)
        assert le.w13.fmt == "q4_k" and le.w2.fmt == "int8g16" and le.w2.zero is not None
    ref = logits(exact, reference_experts(path, exact.cfg))
    torch.testing.assert_close(logits(exact), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(load_gguf(path, dtype="float32", device="cpu")), ref, rtol=0, atol=2e-2)


def test_mixed_layer_types_fall_back_per_matrix(tmp_path):
    """A type without a quantized slot format (BF16) in one layer -> every layer's w2 dequantized."""
    lm = build("tiny-qwen3-moe", wide=True)
    path = write_gguf(lm, tmp_path / "m.gguf", "q4_k", overrides={"blk.1.ffn_down_exps.weight": "bf16"})[0]
    with pytest.warns(UserWarning, match="w2 mix"):
        g = load_gguf(path, dtype="float32", device="cpu")
    for l in g.store.layers:
        le = g.store.layer(l)
        assert isinstance(le.w13, QuantizedWeight) and isinstance(le.w2, torch.Tensor)
    torch.testing.assert_close(logits(g), logits(g, reference_experts(path, g.cfg)), rtol=0, atol=2e-2)


def test_per_expert_tensors_of_old_mixtral_files(tmp_path):
    """Mixtral GGUFs converted before 2024 store blk.N.ffn_gate.E.weight per expert: same model."""
    lm = build("tiny-mixtral")
    stacked = write_gguf(lm, tmp_path / "s.gguf", "q4_0")[0]
    path = tmp_path / "old.gguf"
    w = GGUFWriter(path, "llama")
    gguf_export._write_config(w, lm, get_arch("mixtral"), Q.Q4_0)
    gguf_export.write_tokenizer(w, lm.tokenizer, lm.cfg.vocab_size)
    gguf_export._write_dense(w, lm, get_arch("mixtral"), Q.F32)
    I = lm.cfg.moe_intermediate_size
    for l in lm.store.layers:
        le = lm.store.layer(l)
        for which, t in (("gate", le.w13[:, :I]), ("up", le.w13[:, I:]), ("down", le.w2)):
            for e in range(lm.cfg.num_experts):
                gguf_export._add(w, f"blk.{l}.ffn_{which}.{e}.weight", t[e], Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                             # no tensor is ignored
        old = load_gguf(path, dtype="float32", device="cpu")
    new = load_gguf(stacked, dtype="float32", device="cpu")
    assert old.cfg == new.cfg and old.store.layer(0).w13.fmt == "int4g32"
    assert torch.equal(logits(old), logits(new))


def test_split_files(tmp_path):
    lm = build("tiny-olmoe")
    one = write_gguf(lm, tmp_path / "one.gguf", "q4_0")[0]
    parts = write_gguf(lm, tmp_path / "split.gguf", "q4_0", split_max_tensors=20)
    assert len(parts) > 2 and parts[0].name.endswith(f"-00001-of-{len(parts):05d}.gguf")
    a, b = load_gguf(one, dtype="float32", device="cpu"), load_gguf(parts[1], dtype="float32", device="cpu")
    assert a.cfg == b.cfg and torch.equal(logits(a), logits(b))
    parts[-1].unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_gguf(parts[0], device="cpu")


# ---- errors ----

def _metadata_only(path, arch, **ints):
    w = GGUFWriter(path, arch)
    for k, v in ints.items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture(tmp_path):
    supported = "'gpt2' is not supported; supported: glm4moe, gpt-oss, llama, "
    with pytest.raises(UnsupportedArchitectureError, match=supported):
        load_gguf(_metadata_only(tmp_path / "a.gguf", "gpt2", block_count=1), device="cpu")
    with pytest.raises(UnsupportedArchitectureError, match="without experts"):
        load_gguf(_metadata_only(tmp_path / "b.gguf", "llama", block_count=1), device="cpu")


def test_unsupported_expert_type(tmp_path):
    lm = build("tiny-qwen3-moe")
    path = tmp_path / "m.gguf"
    w = GGUFWriter(path, "qwen3moe")
    gguf_export._write_config(w, lm, get_arch("qwen3_moe"), Q.F32)
    gguf_export._write_dense(w, lm, get_arch("qwen3_moe"), Q.F32)
    E, I, D = lm.cfg.num_experts, lm.cfg.moe_intermediate_size, lm.cfg.hidden_size
    for l in lm.cfg.moe_layers:
        for which, shape in (("gate", (E, I, D)), ("up", (E, I, D)), ("down", (E, D, I))):
            w.add_tensor(f"blk.{l}.ffn_{which}_exps.weight", np.zeros(shape, np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="blk.0.ffn_gate_exps.weight has GGUF type I32, which is not"):
        load_gguf(path, device="cpu")


def test_truncated_and_incomplete_files(tmp_path):
    lm = build("tiny-qwen3-moe")
    path = write_gguf(lm, tmp_path / "m.gguf", "q4_0")[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_gguf(path, device="cpu")
    path.write_bytes(b"GGUF\x07" + data[5:])                       # unknown version
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        load_gguf(path, device="cpu")


def test_missing_dense_tensor(tmp_path):
    lm = build("tiny-qwen3-moe")
    del lm.model.model.norm.weight                                 # the writer then omits output_norm
    lm.model.model.norm.register_parameter("weight", None)
    path = write_gguf(lm, tmp_path / "m.gguf", "q4_0")[0]
    with pytest.raises(ModelLoadError, match="lacks tensor.*model.norm.weight"):
        load_gguf(path, device="cpu")


def test_write_to_directory(tmp_path):
    lm = build("tiny-olmoe")
    assert write_gguf(lm, tmp_path / "out", "q4_0") == [tmp_path / "out" / "model.gguf"]
    assert load_gguf(tmp_path / "out" / "model.gguf", device="cpu").cfg == lm.cfg


def test_write_errors(tmp_path):
    lm = build("tiny-qwen3-moe")
    with pytest.raises(Exception, match="unknown GGUF quant 'q3_x'"):
        write_gguf(lm, tmp_path / "m.gguf", "q3_x")
