"""Greedy output of our engine on a GGUF equals transformers loading the same GGUF (qwen3moe, qwen2moe).

transformers 5.24 reads these GGUFs' weights, but its GGUF config mapping drops expert_feed_forward_length
(moe_intermediate_size) and expert_shared_feed_forward_length, so the config is passed explicitly;
the weights come from the GGUF through transformers' own dequantizer and tensor mapping. Needs accelerate.
"""

import warnings

import pytest
import torch

from hotexperts.engine import presets
from hotexperts.engine.generate import Generator
from hotexperts.engine.gguf_export import write_gguf
from hotexperts.engine.load_gguf import load_gguf
from hotexperts.engine.sampling import SamplingParams
from hotexperts.experts.reference import DenseExecutor

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

CONFIGS = {"qwen3_moe": "Qwen3MoeConfig", "qwen2_moe": "Qwen2MoeConfig"}
PROMPT = "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n"


def build(preset: str, wide: bool = False):
    """float32 preset; wide: hidden and expert width 256 (Q4_K rows), 2 layers, 8 experts."""
    if not wide:
        return presets.build_in_memory(preset, dtype="float32", device="cpu")
    cfg = presets.preset_config(preset)
    cfg.update({"hidden_size": 256, "moe_intermediate_size": 256, "num_hidden_layers": 2, "head_dim": 64,
                "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2})
    presets.PRESETS["wide"] = presets.Preset(cfg, presets.PRESETS[preset].tok, "test")
    try:
        return presets.build_in_memory("wide", dtype="float32", device="cpu")
    finally:
        del presets.PRESETS["wide"]


def ours_greedy(lm, ids, n):
    ex = DenseExecutor({l: lm.store.layer(l) for l in lm.store.layers})
    gen = Generator(lm.model, ex, lm.cfg, "cpu", 256, use_cuda_graph=False)
    return list(gen.generate(ids, SamplingParams(max_tokens=n, stop_token_ids=())))


def hf_greedy(path, hf_config, ids, n):
    cfg_cls = getattr(transformers, CONFIGS[hf_config["model_type"]])
    skip = ("architectures", "model_type", "torch_dtype")
    cfg = cfg_cls(**{k: v for k, v in hf_config.items() if k not in skip})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              config=cfg, dtype=torch.float32)
    out = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                     pad_token_id=0)
    return out[0, len(ids):].tolist(), m


CASES = [("tiny-qwen3-moe", "q4_k", True), ("tiny-qwen2-moe", "q4_0", False),
         ("tiny-qwen2-moe", "q6_k", False), ("tiny-qwen3-moe", "q8_0", False)]


@pytest.mark.parametrize("preset,quant,wide", CASES)
def test_greedy_matches_transformers(tmp_path, preset, quant, wide):
    lm = build(preset, wide=wide)
    path = write_gguf(lm, tmp_path / "m.gguf", quant, dense="f16")[0]
    ours = load_gguf(path, dtype="float32", device="cpu", expert_scale_dtype="float32")
    ids = ours.tokenizer.encode(PROMPT, add_special_tokens=False)
    n = 12
    want, m = hf_greedy(path, lm.hf_config, ids, n)
    got = ours_greedy(ours, ids, n)
    assert got == want
    with torch.inference_mode():                                  # and the logits themselves
        ex = DenseExecutor({l: ours.store.layer(l) for l in ours.store.layers})
        mine = ours.model(torch.tensor(ids), torch.arange(len(ids)), ours.model.new_kv_cache(64), ex)
        theirs = m(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-3)
