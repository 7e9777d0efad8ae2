"""Qwen3.5-MoE (qwen35moe) and Qwen3-Next (qwen3next) GGUF files: a transformers model -> our HF loader ->
our GGUF writer -> our GGUF loader gives transformers' logits; the file holds llama.cpp's transforms
(norms w + 1, ssm_a = -exp(A_log), squeezed conv, tiled V heads for qwen35moe, fused ssm_in for qwen3next)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers as tf
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from hotexperts.engine import presets
from hotexperts.engine.gguf_export import write_gguf
from hotexperts.engine.load import load_model
from hotexperts.engine.load_gguf import load_gguf
from hotexperts.experts.reference import DenseExecutor
from hotexperts.loading import gguf_quants as gq
from hotexperts.loading.gguf_reader import GGUFFile
from hotexperts.models import get_arch

# class names, resolved when a test runs: importing a transformers modeling module while this file is
# collected (before tests/kernels sets TRITON_INTERPRET) breaks the Triton interpreter tests after it
HF = {"tiny-qwen3.5-moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
      "tiny-qwen3-next": ("Qwen3NextConfig", "Qwen3NextForCausalLM")}
PROMPT = torch.tensor([5, 17, 300, 2, 77, 900, 41, 8, 123, 64, 3, 1000])


def hf_model(preset: str):
    cfg_cls, model_cls = (getattr(tf, n) for n in HF[preset])
    d = {k: v for k, v in presets.preset_config(preset).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**d)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                           # spread weights: routing and logits far from ties
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            std = 1.0 if "embed" in name else 1.0 / p.shape[-1] ** 0.5
            p.copy_(0.5 + 0.1 * noise if p.dim() == 1 else std * noise)        # 1-D: norms, A_log, dt_bias
    return model


def our_logits(lm, tokens=PROMPT):
    ex = DenseExecutor({l: lm.store.layer(l) for l in lm.store.layers}, "cpu", torch.float32)
    with torch.inference_mode():
        return lm.model(tokens, torch.arange(len(tokens)), lm.model.new_kv_cache(64), ex)


@pytest.fixture(scope="module", params=sorted(HF))
def chain(request, tmp_path_factory):
    """(preset, transformers model, our HF-loaded model, the GGUF path, our GGUF-loaded model)."""
    tmp = tmp_path_factory.mktemp(request.param)
    hf = hf_model(request.param)
    hf.save_pretrained(tmp / "hf")
    lm = load_model(tmp / "hf", dtype="float32", device="cpu", progress=False)
    path = write_gguf(lm, tmp / "m.gguf", quant="f32", dense="f32")[0]
    return request.param, hf, lm, path, load_gguf(path, dtype="float32", device="cpu")


@torch.no_grad()
def test_gguf_from_our_writer_gives_transformers_logits(chain):
    _, hf, lm, _, g = chain
    ref = hf(PROMPT[None]).logits[0]
    torch.testing.assert_close(our_logits(lm), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(our_logits(g), ref, atol=1e-4, rtol=1e-4)
    assert g.cfg == replace(lm.cfg, bos_token_id=None, eos_token_ids=())    # the HF dir has no tokenizer
    sd = g.model.state_dict()
    for k, v in lm.model.state_dict().items():             # transforms undone (w+1-1, log(exp) to ~1 ulp)
        torch.testing.assert_close(sd[k], v, atol=1e-6, rtol=1e-6, msg=k)


def _tensor(f: GGUFFile, name: str) -> torch.Tensor:
    info = f.info(name)
    return gq.dequantize(f.raw(name), info.qtype, info.shape, name).float()


def _tiled(t: torch.Tensor, Hk: int, r: int) -> torch.Tensor:
    """Rows of value heads in llama.cpp's tiled order: new row j*Hk + k holds HF's (grouped) row k*r + j."""
    idx = torch.tensor([k * r + j for j in range(r) for k in range(Hk)])
    return t.unflatten(0, (Hk * r, -1))[idx].flatten(0, 1)


def test_file_holds_llama_cpp_transforms(chain):
    preset, hf, lm, path, _ = chain
    f, cfg, sd = GGUFFile(path), lm.cfg, lm.model.state_dict()
    s = cfg.linear
    Hk, r = s.num_key_heads, s.num_value_heads // s.num_key_heads
    tiled = (lambda t: _tiled(t, Hk, r)) if preset == "tiny-qwen3.5-moe" else (lambda t: t)
    lin = "model.layers.0.linear_attn."
    assert f.get("general.architecture") == get_arch(cfg.model_type).gguf_arch
    assert f.get(f"{f.get('general.architecture')}.full_attention_interval") == 4
    torch.testing.assert_close(_tensor(f, "blk.0.attn_norm.weight"),
                               sd["model.layers.0.input_layernorm.weight"] + 1)
    torch.testing.assert_close(_tensor(f, "blk.3.post_attention_norm.weight"),
                               sd["model.layers.3.post_attention_layernorm.weight"] + 1)
    torch.testing.assert_close(_tensor(f, "blk.0.ssm_norm.weight"), sd[lin + "norm.weight"])  # not shifted
    torch.testing.assert_close(_tensor(f, "blk.0.ssm_a"), tiled(-sd[lin + "A_log"].exp()))
    torch.testing.assert_close(_tensor(f, "blk.0.ssm_dt.bias"), tiled(sd[lin + "dt_bias"]))
    conv = sd[lin + "conv1d.weight"][:, 0]                                              # [C, Kc]
    qk = 2 * Hk * s.key_head_dim
    torch.testing.assert_close(_tensor(f, "blk.0.ssm_conv1d.weight"),
                               torch.cat((conv[:qk], tiled(conv[qk:]))))
    if preset == "tiny-qwen3.5-moe":
        torch.testing.assert_close(_tensor(f, "blk.0.ssm_alpha.weight"), tiled(sd[lin + "in_proj_a.weight"]))
        out = sd[lin + "out_proj.weight"]
        torch.testing.assert_close(_tensor(f, "blk.0.ssm_out.weight"), tiled(out.t().contiguous()).t())
        assert f.get("qwen35moe.rope.dimension_sections") == [11, 11, 10, 0]
    else:
        torch.testing.assert_close(_tensor(f, "blk.0.ssm_in.weight"), sd[lin + "in_proj_qkvz.weight"])
        torch.testing.assert_close(_tensor(f, "blk.0.ssm_ba.weight"), sd[lin + "in_proj_ba.weight"])
    assert f.get(f"{f.get('general.architecture')}.rope.dimension_count") == cfg.rotary_dim


def test_q8_0_dense_projections_stay_quantized_and_exact(chain, tmp_path):
    preset, _, lm, _, _ = chain
    path = write_gguf(lm, tmp_path / "q8.gguf", quant="q8_0", dense="q8_0")[0]
    keep = load_gguf(path, dtype="float32", device="cpu")
    plain = load_gguf(path, dtype="float32", device="cpu", dense_quant="dequantize")
    assert type(keep.model.model.layers[0].linear_attn.out_proj).__name__ == "QuantLinear"
    torch.testing.assert_close(our_logits(keep), our_logits(plain), atol=1e-4, rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(our_logits(keep), our_logits(lm), dim=-1)   # Q8_0 rounding
    assert cos.median() > 0.99                       # a routing flip may move one position more


@pytest.mark.skipif(not {"qwen35moe", "qwen3next"} & set(GGUF_SUPPORTED_ARCHITECTURES),
                    reason="transformers 5.24 cannot load qwen35moe / qwen3next GGUF files "
                           "(modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES)")
def test_transformers_loads_our_gguf(chain):
    preset, hf, _, path, _ = chain
    if get_arch(hf.config.model_type).gguf_arch not in GGUF_SUPPORTED_ARCHITECTURES:
        pytest.skip("this architecture's GGUF is not supported by transformers")
    other = type(hf).from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.no_grad():
        torch.testing.assert_close(other(PROMPT[None]).logits, hf(PROMPT[None]).logits, atol=1e-4, rtol=1e-4)
