"""Qwen3.5-MoE / Qwen3-Next presets: the real shapes (issue 17's facts), and `make-model` writing HF
directories transformers loads to our logits, and GGUF files our loader reads back to the same logits."""

import argparse

import pytest
import torch
import transformers as tf

from hotexperts.engine.load import load_model
from hotexperts.engine.load_gguf import load_gguf
from hotexperts.engine.presets import add_parser, build_in_memory, preset_config
from hotexperts.experts.reference import DenseExecutor
from hotexperts.models import config_from_hf

REAL = {  # layers (DeltaNet), D, heads/kv x hd, DeltaNet Hk/Hv x dk, experts, top-k, expert / shared FFN, vocab
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
