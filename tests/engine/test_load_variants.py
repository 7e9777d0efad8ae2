"""GPT-OSS and GLM-4.5 checkpoints written by transformers' save_pretrained load with load_model and give
transformers' logits (fp32); GLM's MTP layer (model.layers.{L}.*, experts included) is skipped with one
warning. transformers' modeling modules are imported inside the fixture, never at collection time (that
breaks the Triton interpreter tests collected after this module)."""

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotexperts.engine.load import load_model
from hotexperts.experts.reference import DenseExecutor

COMMON = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
KW = {"gpt_oss": dict(num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, intermediate_size=48,
                      sliding_window=5),
      "glm4_moe": dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=32, intermediate_size=48, n_group=4, topk_group=2,
                       routed_scaling_factor=2.5, first_k_dense_replace=1, use_qk_norm=True,
                       attention_bias=True)}


def _hf(kind: str):
    import transformers as tf  # inside: see the module doc

    cls = {"gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM),
           "glm4_moe": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM)}
    cfg_cls, model_cls = cls[kind]
    torch.manual_seed(0)
    m = model_cls(cfg_cls(**COMMON, **KW[kind])).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            std = 1.0 if "embed" in name else (0.3 if p.dim() == 1 else 1.0 / p.shape[-1] ** 0.5)
            p.copy_(std * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name else 0.0))
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return m


@pytest.fixture(scope="module", params=sorted(KW))
def saved(request, tmp_path_factory):
    hf = _hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def _logits(lm, toks):
    ex = DenseExecutor({l: lm.store.layer(l) for l in lm.store.layers})
    with torch.inference_mode():
        return lm.model(toks, torch.arange(len(toks)), lm.model.new_kv_cache(32), ex)


def test_load_model_matches_transformers(saved):
    kind, hf, path = saved
    lm = load_model(path, dtype="float32", device="cpu", progress=False)
    toks = torch.randint(1, 96, (14,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = hf(toks[None]).logits[0]
    torch.testing.assert_close(_logits(lm, toks), ref, atol=1e-4, rtol=1e-4)
    if kind == "gpt_oss":
        le = lm.store.layer(0)
        assert le.act.kind == "swiglu_oai" and le.b13.shape == (8, 96) and lm.cfg.mixed_windows


def test_glm_mtp_layer_is_skipped_with_one_warning(saved, tmp_path):
    kind, hf, path = saved
    if kind != "glm4_moe":
        pytest.skip("GLM only")
    sd = load_file(path / "model.safetensors")
    L = hf.config.num_hidden_layers
    mtp = {k.replace("model.layers.2.", f"model.layers.{L}."): v.clone() for k, v in sd.items()
           if k.startswith("model.layers.2.")}
    mtp[f"model.layers.{L}.eh_proj.weight"] = torch.zeros(64, 128)
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file({**sd, **mtp}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = load_model(tmp_path, dtype="float32", device="cpu", progress=False)
    ignored = [w for w in caught if "ignored" in str(w.message)]
    assert len(ignored) == 1 and f"model.layers.{L}" in str(ignored[0].message)
    assert lm.cfg.num_layers == L
