"""load_model: round trip of preset dirs (single file and sharded), clear errors, ExpertStore basics,
and that the written dirs load in transformers."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotexperts.engine.load import load_model
from hotexperts.engine.presets import build_in_memory, write_hf_dir, write_weights
from hotexperts.errors import ModelLoadError, UnsupportedArchitectureError
from hotexperts.experts.reference import DenseExecutor
from hotexperts.experts.store import ExpertStore
from hotexperts.weights import LayerExperts

TINY = ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral", "tiny-olmoe"]


def logits(lm, text="Hello world, café 日本"):
    toks = torch.tensor(lm.tokenizer.encode(text))
    ex = DenseExecutor({l: lm.store.layer(l) for l in lm.store.layers}, dtype=torch.float32)
    with torch.inference_mode():
        return lm.model(toks, torch.arange(len(toks)), lm.model.new_kv_cache(64), ex)


def check_transformers(path, lm):
    """The directory loads in transformers without key problems; same tokens, template and logits."""
    try:
        import transformers
    except ImportError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                    output_loading_info=True)
        tok = transformers.AutoTokenizer.from_pretrained(path)
    assert not any(info.values()), info                   # no missing / unexpected / mismatched keys
    text = "Hello world, café 日本"
    assert tok(text)["input_ids"] == lm.tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        lm.tokenizer.apply_chat_template(msgs)
    with torch.inference_mode():
        ref = m(torch.tensor([lm.tokenizer.encode(text)])).logits[0]
    torch.testing.assert_close(ref, logits(lm, text), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return write_hf_dir("tiny-qwen3-moe", tmp_path_factory.mktemp("q") / "m", dtype="float32", device="cpu")


@pytest.mark.parametrize("preset", TINY)
def test_round_trip_logits_equal_and_transformers_loads_it(tmp_path, preset):
    mem = build_in_memory(preset, "float32", "cpu")
    path = write_hf_dir(preset, tmp_path / "m", dtype="float32", device="cpu")
    lm = load_model(path, "float32", "cpu", progress=False)
    assert lm.cfg == mem.cfg
    assert lm.store.layers == mem.store.layers
    for l in lm.store.layers:
        assert torch.equal(lm.store.layer(l).w13, mem.store.layer(l).w13)
        assert torch.equal(lm.store.layer(l).w2, mem.store.layer(l).w2)
    assert torch.equal(logits(lm), logits(mem))
    assert lm.tokenizer.eos_ids == mem.tokenizer.eos_ids and lm.generation_config == mem.generation_config
    check_transformers(path, lm)


def test_sharded_dir_with_index(tmp_path, qwen_dir):
    lm = load_model(qwen_dir, "float32", "cpu", progress=False)
    out = tmp_path / "sharded"
    out.mkdir()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((qwen_dir / f).read_bytes())
    files = write_weights(lm, out, shard_bytes=200_000)
    assert len(files) > 3 and (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()
    assert torch.equal(logits(load_model(out, "float32", "cpu", progress=False)), logits(lm))


def test_dtypes_and_device(qwen_dir):
    lm = load_model(qwen_dir, "bfloat16", "cpu", progress=False)
    assert lm.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert lm.store.layer(0).w13.dtype == torch.bfloat16 and lm.store.layer(0).w13.device.type == "cpu"
    assert lm.model.rotary.inv_freq.dtype == torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(qwen_dir, "int3", "cpu")


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite(path, fn):
    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_wrong_shape(tmp_path, qwen_dir):
    d = copy_dir(qwen_dir, tmp_path / "m")
    rewrite(d, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(ModelLoadError, match=r"model.norm.weight.*\[7\].*\[128\]"):
        load_model(d, "float32", "cpu", progress=False)


def test_wrong_expert_shape(tmp_path, qwen_dir):
    d = copy_dir(qwen_dir, tmp_path / "m")
    rewrite(d, lambda sd: sd.__setitem__("model.layers.1.mlp.experts.3.up_proj.weight", torch.ones(64, 64)))
    with pytest.raises(ModelLoadError, match="experts.3.up_proj"):
        load_model(d, "float32", "cpu", progress=False)


@pytest.mark.parametrize("name, what", [
    ("model.layers.2.self_attn.q_proj.weight", "q_proj"),
    ("model.layers.3.mlp.experts.5.down_proj.weight", "experts of layer 3")])
def test_missing_tensor(tmp_path, qwen_dir, name, what):
    d = copy_dir(qwen_dir, tmp_path / "m")
    rewrite(d, lambda sd: sd.pop(name))
    with pytest.raises(ModelLoadError, match=what):
        load_model(d, "float32", "cpu", progress=False)


def test_unknown_model_type(tmp_path, qwen_dir):
    d = copy_dir(qwen_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama4"}))
    with pytest.raises(UnsupportedArchitectureError, match="llama4.*qwen3_moe"):
        load_model(d, "float32", "cpu")


def test_missing_config(tmp_path, qwen_dir):
    d = copy_dir(qwen_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_model(d, "float32", "cpu")


def test_extra_tensors_are_ignored_with_a_warning(tmp_path, qwen_dir):
    d = copy_dir(qwen_dir, tmp_path / "m")
    rewrite(d, lambda sd: sd.__setitem__("mtp.extra.weight", torch.ones(2)))
    with pytest.warns(UserWarning, match="mtp.extra.weight"):
        load_model(d, "float32", "cpu", progress=False)


# ---- ExpertStore ----

def small_store(E=4, I=8, D=16):
    return ExpertStore({l: LayerExperts(torch.randn(E, 2 * I, D), torch.randn(E, D, I)) for l in (1, 3)})


def test_store_accessors():
    s = small_store()
    assert s.layers == [1, 3] and s.num_experts == 4
    assert s.expert_nbytes == 3 * 8 * 16 * 4 and s.nbytes == 2 * 4 * s.expert_nbytes
    assert s[3] is s.layer(3)


def test_pin_without_cuda_is_a_noop(monkeypatch):
    s = small_store()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pytest.fail("pin_memory called"))
    w = s.layer(1).w13
    assert s.pin() is s and s.layer(1).w13 is w and not s.pinned


def test_pin_failure_keeps_pageable_and_warns_once(monkeypatch):
    s = small_store()
    calls = []

    def fake_pin(self):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("cudaHostAlloc failed")
        return self.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    with pytest.warns(RuntimeWarning, match="pinning failed after 0.0 GiB"):
        s.pin()
    assert s.layer_pinned(1) and not s.layer_pinned(3) and not s.pinned


def test_store_rejects_unequal_layers():
    with pytest.raises(ValueError):
        ExpertStore({0: LayerExperts(torch.zeros(2, 4, 4), torch.zeros(2, 4, 2)),
                     1: LayerExperts(torch.zeros(3, 4, 4), torch.zeros(3, 4, 2))})


def test_no_stale_loading_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """Issue 19: logs and pipes got a 'loading: 0%' bar that was never cleared; the bar is a terminal's."""
    write_hf_dir("tiny-qwen3-moe", tmp_path / "m", dtype="float32", device="cpu")
    capsys.readouterr()
    load_model(tmp_path / "m", "float32", "cpu")
    assert "loading" not in capsys.readouterr().err
