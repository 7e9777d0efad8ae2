"""Qwen3.5-MoE / Qwen3-Next presets: the real shapes (issue 17's facts), and `make-model` writing HF
directories transformers loads to our logits, and GGUF files our loader reads back to the same logits."""

import argparse
import json
import warnings

import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGUFWriter

from hotexperts.cli.make_model import add_parser
from hotexperts.engine.gguf_export import write_gguf
from hotexperts.engine.load import load_model
from hotexperts.engine.load_gguf import load_gguf
from hotexperts.engine.presets import build_in_memory, preset_config
from hotexperts.errors import ModelLoadError
from hotexperts.experts.reference import DenseExecutor
from hotexperts.loading import gguf_quants as gq
from hotexperts.loading.gguf_reader import GGUFFile
from hotexperts.models import config_from_hf

REAL = {  # layers (DeltaNet), D, heads/kv x hd, DeltaNet Hk/Hv x dk, E, top-k, expert/shared FFN, vocab
    "qwen3.5-122b-a10b": (48, 36, 3072, 32, 2, 256, 16, 64, 128, 256, 8, 1024, 1024, 248320),
    "qwen3.5-35b-a3b": (40, 30, 2048, 16, 2, 256, 16, 32, 128, 256, 8, 512, 512, 248320),
    "qwen3-next-80b-a3b": (48, 36, 2048, 16, 2, 256, 16, 32, 128, 512, 10, 512, 512, 151936),
}
TOKENS = torch.tensor([5, 17, 300, 2, 77, 900, 41, 8, 123, 64, 3, 1000])


@pytest.mark.parametrize("name", REAL)
def test_real_shapes(name):
    c = config_from_hf(preset_config(name))
    s = c.linear
    got = (c.num_layers, len(c.linear_layers), c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
           s.num_key_heads, s.num_value_heads, s.key_head_dim, c.num_experts, c.top_k,
           c.moe_intermediate_size, c.shared_expert_intermediate_size, c.vocab_size)
    assert got == REAL[name]
    assert c.attention_layers == tuple(range(3, c.num_layers, 4)) and c.rotary_dim == 64
    assert (c.rope_theta, s.conv_kernel, c.moe_layers) == (1e7, 4, tuple(range(c.num_layers)))


def logits(lm):
    ex = DenseExecutor({l: lm.store.layer(l) for l in lm.store.layers}, "cpu", torch.float32)
    with torch.inference_mode():
        return lm.model(TOKENS, torch.arange(len(TOKENS)), lm.model.new_kv_cache(32), ex)


def make_model(*argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["make-model", *argv, "--seed", "3", "--dtype", "float32", "--device", "cpu"])
    assert args.func(args) == 0


@pytest.mark.parametrize("preset", ["tiny-qwen3.5-moe", "tiny-qwen3-next"])
def test_make_model_writes_hf_and_gguf_of_the_same_model(tmp_path, preset):
    ref = logits(build_in_memory(preset, dtype="float32", device="cpu", seed=3))
    make_model("--preset", preset, "--out", str(tmp_path / "hf"))
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS[None]).logits[0], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(load_model(tmp_path / "hf", "float32", "cpu", progress=False)), ref)
    make_model("--preset", preset, "--out", str(tmp_path / "m.gguf"), "--format", "gguf", "--quant", "f32",
               "--dense", "f32")
    g = load_gguf(tmp_path / "m.gguf", dtype="float32", device="cpu")
    torch.testing.assert_close(logits(g), ref, atol=1e-4, rtol=1e-4)
    assert g.tokenizer.encode("Hello world") == build_in_memory(preset, dtype="float32").tokenizer.encode(
        "Hello world")


def _vlm_dir(tmp_path, mtp_layers: int = 1):
    """make-model's tiny Qwen3.5 directory re-spelled as the published VLM checkpoint: nested text_config,
    `model.language_model.` names, a vision tower and `mtp_layers` MTP layers."""
    from safetensors.torch import load_file, save_file

    make_model("--preset", "tiny-qwen3.5-moe", "--out", str(tmp_path))
    sd = load_file(tmp_path / "model.safetensors")
    sd = {(k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
          for k, v in sd.items()}
    sd |= {f"model.visual.blocks.{i}.attn.qkv.weight": torch.zeros(4, 4) for i in range(3)}
    sd |= {f"mtp.layers.{i}.mlp.gate.weight": torch.zeros(4, 4) for i in range(mtp_layers)}
    sd["mtp.fc.weight"] = torch.zeros(4, 4)
    save_file(sd, tmp_path / "model.safetensors")
    text = json.loads((tmp_path / "config.json").read_text())
    text["mtp_num_hidden_layers"] = mtp_layers
    cfg = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
           "text_config": text, "vision_config": {"depth": 3}, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("mtp_layers", [1, 2])
def test_vlm_checkpoint_loads_the_text_model_with_one_warning(tmp_path, mtp_layers):
    ref = logits(build_in_memory("tiny-qwen3.5-moe", dtype="float32", device="cpu", seed=3))
    path = _vlm_dir(tmp_path, mtp_layers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = load_model(path, "float32", "cpu", progress=False)
    assert len(caught) == 1, [str(w.message) for w in caught]
    msg = str(caught[0].message)
    assert "model.visual.*: 3" in msg and f"mtp.*: {mtp_layers + 1}" in msg
    torch.testing.assert_close(logits(lm), ref)


def test_unknown_layer_type_in_a_checkpoint_is_one_clear_error(tmp_path):
    path = _vlm_dir(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["layer_types"] = ["linear_attention"] * 3 + ["sliding_attention"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"layer_types\[3\] = 'sliding_attention' is not supported"):
        load_model(path, "float32", "cpu", progress=False)


def test_gguf_mtp_blocks_are_left_out_with_one_warning(tmp_path):
    """llama.cpp appends the MTP block as blk.{L} and counts it in block_count (nextn_predict_layers)."""
    lm = build_in_memory("tiny-qwen3.5-moe", dtype="float32", device="cpu", seed=3)
    path = write_gguf(lm, tmp_path / "m.gguf", quant="f32", dense="f32")[0]
    src = GGUFFile(path)
    arch = src.get("general.architecture")
    w = GGUFWriter(tmp_path / "mtp.gguf", arch)
    for key in src.metadata:
        if key.startswith(f"{arch}.") or key.startswith("tokenizer."):
            value = src.get(key)
            _add_value(w, key, value + 1 if key == f"{arch}.block_count" else value)
    w.add_uint32(f"{arch}.nextn_predict_layers", 1)
    L = lm.cfg.num_layers
    for name in src.names():
        info = src.info(name)
        t = gq.dequantize(src.raw(name), info.qtype, info.shape, name).numpy()
        w.add_tensor(name, t)
        if name.startswith("blk.3."):                        # the MTP block: a copy of an attention block
            w.add_tensor(name.replace("blk.3.", f"blk.{L}.", 1), t)
    w.add_tensor(f"blk.{L}.nextn.eh_proj.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = load_gguf(tmp_path / "mtp.gguf", dtype="float32", device="cpu")
    assert [str(c.message) for c in caught if "ignored" in str(c.message)] and len(caught) == 1
    assert g.cfg.num_layers == L and g.cfg.moe_layers == tuple(range(L))
    torch.testing.assert_close(logits(g), logits(lm), atol=1e-4, rtol=1e-4)


def _add_value(w, key, value):
    if isinstance(value, list):
        w.add_array(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    else:
        w.add_float32(key, value)
