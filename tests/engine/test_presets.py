"""Presets: real shapes match the public config.json files; seeded builds; diverse routing; make-model CLI."""

import argparse
import json

import pytest
import torch

from hotexperts.cli.make_model import add_parser
from hotexperts.engine.presets import (
    PRESETS,
    TINY_DESCRIPTION,
    TINY_TOKENIZER,
    build_in_memory,
    preset_config,
    routing_diversity,
    run,
    tiny_name,
)
from hotexperts.errors import HotExpertsError
from hotexperts.models import ARCHITECTURES, config_from_hf

REAL = {  # name: (layers, experts, top_k, hidden, moe_intermediate, heads, kv_heads, vocab)
    "qwen3-30b-a3b": (48, 128, 8, 2048, 768, 32, 4, 151936),
    "mixtral-8x7b": (32, 8, 2, 4096, 14336, 32, 8, 32000),
    "olmoe-1b-7b": (16, 64, 8, 2048, 1024, 16, 16, 50304),
    "qwen1.5-moe-a2.7b": (24, 60, 4, 2048, 1408, 16, 16, 151936),
}


@pytest.mark.parametrize("name", REAL)
def test_real_shapes(name):
    c = config_from_hf(preset_config(name))
    got = (c.num_layers, c.num_experts, c.top_k, c.hidden_size, c.moe_intermediate_size, c.num_heads,
           c.num_kv_heads, c.vocab_size)
    assert got == REAL[name]
    assert c.moe_layers == tuple(range(c.num_layers))


def test_real_shape_details():
    q3 = config_from_hf(preset_config("qwen3-30b-a3b"))
    assert (q3.head_dim, q3.qk_norm, q3.norm_topk_prob, q3.rope_theta) == (128, "head", True, 1e6)
    q15 = config_from_hf(preset_config("qwen1.5-moe-a2.7b"))
    assert q15.shared_expert_intermediate_size == 5632 and not q15.norm_topk_prob
    assert config_from_hf(preset_config("olmoe-1b-7b")).qk_norm == "full"


def test_preset_config_is_a_copy():
    preset_config("tiny-qwen3-moe")["hidden_size"] = 1
    assert preset_config("tiny-qwen3-moe")["hidden_size"] == 128


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny-")])
def test_tiny_presets_build_and_route_diversely(name):
    lm = build_in_memory(name, "float32", "cpu", seed=1)
    assert lm.tokenizer.vocab_size <= lm.cfg.vocab_size
    assert lm.store.nbytes < 16 * 1024 ** 2
    for layer, (used, top_share) in routing_diversity(lm, 128).items():
        assert used == lm.cfg.num_experts, layer
        assert top_share < 3.0 / lm.cfg.num_experts, layer


def test_seeded_build_is_deterministic():
    a, b = (build_in_memory("tiny-mixtral", "float32", "cpu", seed=3) for _ in range(2))
    c = build_in_memory("tiny-mixtral", "float32", "cpu", seed=4)
    assert torch.equal(a.store.layer(0).w13, b.store.layer(0).w13)
    assert not torch.equal(a.store.layer(0).w13, c.store.layer(0).w13)
    assert not torch.equal(a.model.model.layers[0].block_sparse_moe.gate.weight,
                           a.model.model.layers[1].block_sparse_moe.gate.weight)


def test_expert_dtype():
    lm = build_in_memory("tiny-olmoe", "float32", "cpu", expert_dtype="bfloat16")
    assert lm.store.layer(0).w13.dtype == torch.bfloat16
    assert lm.model.model.embed_tokens.weight.dtype == torch.float32


def test_quantized_experts():
    from hotexperts.weights import QuantizedWeight

    lm = build_in_memory("tiny-mixtral", "float32", "cpu", expert_dtype="int8")
    assert isinstance(lm.store.layer(0).w13, QuantizedWeight) and lm.store.layer(0).w13.fmt == "int8"
    c = lm.cfg
    assert lm.store.layer(0).w13.shape == (c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size)
    assert lm.store.expert_nbytes < build_in_memory("tiny-mixtral", "float32", "cpu").store.expert_nbytes / 3


def test_unknown_preset():
    with pytest.raises(HotExpertsError, match="unknown preset 'nope'.*tiny-qwen3-moe"):
        build_in_memory("nope")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    return parser, parser.parse_args(argv)


def test_make_model_cli(tmp_path, capsys):
    parser, args = parse(["make-model", "--preset", "tiny-olmoe", "--out", str(tmp_path / "m"), "--seed", "2",
                          "--dtype", "float32", "--device", "cpu"])
    assert args.func(args) == 0
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "float32"
    assert "tiny-olmoe" in capsys.readouterr().out
    sub = parser._subparsers._group_actions[0].choices["make-model"]
    assert all(name in sub.format_help() for name in PRESETS)


def test_make_model_unknown_preset(tmp_path):
    _, args = parse(["make-model", "--preset", "huge", "--out", str(tmp_path / "m")])
    with pytest.raises(HotExpertsError, match="unknown preset"):
        run(args)
    assert not (tmp_path / "m").exists()


def test_make_model_files_follow_the_umask(tmp_path):
    """model.safetensors is written as readable as config.json (safetensors itself writes 0600)."""
    import os

    from hotexperts.engine.presets import write_hf_dir
    out = write_hf_dir("tiny-qwen3-moe", tmp_path / "m", dtype="float32")
    mode = lambda name: os.stat(out / name).st_mode & 0o777  # noqa: E731
    assert mode("model.safetensors") == mode("config.json")


def test_cat_of_gguf_block_weights_keeps_no_scale():
    """Q4_K parts carry their scales inside the blocks (scale None): concatenating them must not fail (the
    qwen3.5-122b-a10b preset with --expert-quant q4_k crashed here on an H100)."""
    import torch

    from hotexperts.engine.presets import _cat
    from hotexperts.quant import quantize_q4_k

    parts = [quantize_q4_k(torch.randn(2, 4, 256)) for _ in range(2)]
    assert parts[0].scale is None
    out = _cat(parts)
    assert out.scale is None and out.q.shape[0] == 4


def test_every_registered_architecture_has_its_tiny_preset_and_no_other_exists():
    tiny = {name: p for name, p in PRESETS.items() if name.startswith("tiny-")}
    assert list(tiny) == [tiny_name(t) for t in ARCHITECTURES]
    assert all(tiny[tiny_name(t)].config is arch.tiny for t, arch in ARCHITECTURES.items())
    assert set(TINY_DESCRIPTION) | set(TINY_TOKENIZER) <= set(ARCHITECTURES)       # no stale entries
    assert (tiny_name("qwen3_5_moe"), tiny_name("glm4_moe"), tiny_name("mixtral")) == \
        ("tiny-qwen3.5-moe", "tiny-glm4-moe", "tiny-mixtral")
