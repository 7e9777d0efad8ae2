"""rename / config_from_hf / split_state_dict on real transformers checkpoints, both expert layouts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hotexperts.errors import ModelLoadError, UnsupportedArchitectureError
from hotexperts.models import ARCHITECTURES, config_from_hf, get_arch, naming, split_state_dict
from hotexperts.models.architecture import Architecture
from hotexperts.models.naming import ExpertRef
from hotexperts.models.transformer import MoETransformer

ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


def saved(hf, tmp_path) -> tuple[dict, dict[str, torch.Tensor]]:
    hf.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text()), load_file(tmp_path / "model.safetensors")


def assert_same_experts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for layer in a:
        assert torch.equal(a[layer].w13, b[layer].w13) and torch.equal(a[layer].w2, b[layer].w2)


def per_expert_to_stacked(sd: dict, transpose: bool = False, fuse: bool = True) -> dict:
    """Rewrite a per-expert state dict into transformers-5 stacked tensors (optionally [E, in, out])."""
    out, groups = {}, {}
    for name, t in sd.items():
        ref = get_arch_of_names(sd).rename(name)
        if isinstance(ref, ExpertRef):
            groups.setdefault((ref.layer, ref.which), {})[ref.expert] = t
        else:
            out[name] = t
    for (layer, which), per in groups.items():
        groups[(layer, which)] = torch.stack([per[e] for e in sorted(per)])
    for layer in sorted({k[0] for k in groups}):
        gate, up, down = (groups[(layer, w)] for w in ("gate", "up", "down"))
        mats = {"gate_up_proj": torch.cat([gate, up], 1)} if fuse else {"gate_proj": gate, "up_proj": up}
        mats["down_proj"] = down
        for n, t in mats.items():
            out[f"model.layers.{layer}.mlp.experts.{n}"] = t.transpose(1, 2).contiguous() if transpose else t
    return out


def get_arch_of_names(sd: dict):
    return get_arch("mixtral" if any("block_sparse_moe" in n for n in sd) else "qwen3_moe")


@pytest.mark.parametrize("name", ARCHS)
def test_save_pretrained_checkpoint_maps_through_rename(hf_models, tmp_path, name):
    hf = hf_models(name)
    d, disk = saved(hf, tmp_path)
    arch = get_arch(d["model_type"])
    cfg = arch.config_from_hf(d)
    assert cfg == arch.config_from_hf(hf.config.to_dict())
    refs = [arch.rename(n) for n in disk]
    experts = [r for r in refs if isinstance(r, ExpertRef)]
    # transformers 5.24 writes one tensor per expert and matrix (the in-memory modules are stacked)
    assert experts and all(r.expert is not None for r in experts)
    assert len(experts) == 3 * cfg.num_experts * len(cfg.moe_layers)
    dense_disk, ex_disk = split_state_dict(arch, cfg, disk)
    dense_mem, ex_mem = split_state_dict(arch, cfg, hf.state_dict())
    assert_same_experts(ex_disk, ex_mem)
    assert dense_disk.keys() == dense_mem.keys()
    MoETransformer(cfg).load_state_dict(dense_disk, strict=True)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("fuse", [True, False])
def test_stacked_layouts_give_the_same_experts(hf_models, tmp_path, name, transpose, fuse):
    hf = hf_models(name)
    d, disk = saved(hf, tmp_path)
    arch = get_arch(d["model_type"])
    cfg = arch.config_from_hf(d)
    stacked = per_expert_to_stacked(disk, transpose=transpose, fuse=fuse)
    refs = [arch.rename(n) for n in stacked]
    assert any(isinstance(r, ExpertRef) and r.expert is None for r in refs)
    assert_same_experts(split_state_dict(arch, cfg, stacked)[1], split_state_dict(arch, cfg, disk)[1])


@pytest.mark.parametrize("arch_name, hf_name, want", [
    ("qwen3_moe", "model.layers.7.mlp.experts.12.gate_proj.weight", ExpertRef(7, 12, "gate")),
    ("qwen3_moe", "model.layers.7.mlp.experts.12.down_proj.weight", ExpertRef(7, 12, "down")),
    ("qwen3_moe", "model.layers.7.mlp.experts.gate_up_proj", ExpertRef(7, None, "gate_up")),
    ("qwen3_moe", "model.layers.7.mlp.gate.weight", "model.layers.7.mlp.gate.weight"),
    ("qwen3_moe", "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.gate_proj.weight"),
    ("qwen2_moe", "model.layers.1.mlp.shared_expert.up_proj.weight",
     "model.layers.1.mlp.shared_expert.up_proj.weight"),
    ("qwen2_moe", "model.layers.1.mlp.experts.3.up_proj.weight", ExpertRef(1, 3, "up")),
    ("mixtral", "model.layers.2.block_sparse_moe.experts.5.w1.weight", ExpertRef(2, 5, "gate")),
    ("mixtral", "model.layers.2.block_sparse_moe.experts.5.w3.weight", ExpertRef(2, 5, "up")),
    ("mixtral", "model.layers.2.block_sparse_moe.experts.5.w2.weight", ExpertRef(2, 5, "down")),
    ("mixtral", "model.layers.2.mlp.gate.weight", "model.layers.2.block_sparse_moe.gate.weight"),
    ("mixtral", "model.layers.2.mlp.experts.down_proj", ExpertRef(2, None, "down")),
    ("olmoe", "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
    ("olmoe", "model.rotary_emb.inv_freq", None),
])
def test_rename_examples(arch_name, hf_name, want):
    assert get_arch(arch_name).rename(hf_name) == want


def test_rename_comes_from_what_an_architecture_declares_and_naming_knows_no_family():
    """A made-up family: its block and matrix names are all rename() needs (naming.py names no family)."""
    arch = Architecture(model_type="toy", gguf_arch="toy", config_from_hf=None, hf_from_gguf=None,
                        moe_block="sparse", hf_expert_names=("a", "b", "c"))
    assert arch.rename("model.layers.1.sparse.experts.2.a.weight") == ExpertRef(1, 2, "gate")
    assert arch.rename("model.layers.1.sparse.experts.2.c.weight") == ExpertRef(1, 2, "down")
    assert arch.rename("model.layers.1.mlp.experts.2.up_proj.weight") == ExpertRef(1, 2, "up")   # v5 names
    assert arch.rename("model.layers.1.mlp.gate.weight") == "model.layers.1.sparse.gate.weight"
    with pytest.raises(ModelLoadError, match="unrecognised expert tensor"):
        arch.rename("model.layers.1.sparse.experts.2.w1.weight")             # Mixtral's names are Mixtral's
    assert not hasattr(naming, "MIXTRAL_WHICH")


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_arch("llama")
    assert all(name in str(e.value) for name in ARCHITECTURES) and "'llama'" in str(e.value)
    with pytest.raises(UnsupportedArchitectureError):
        config_from_hf({"model_type": "deepseek_v3"})


def test_config_errors(hf_models):
    d = hf_models("qwen3_moe").config.to_dict()
    with pytest.raises(ModelLoadError, match="moe_intermediate_size"):
        config_from_hf({k: v for k, v in d.items() if k != "moe_intermediate_size"})
    with pytest.raises(ModelLoadError, match="yarn"):
        config_from_hf({**d, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}})
    with pytest.raises(ModelLoadError, match="linear"):
        config_from_hf({**d, "rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ModelLoadError, match="gelu"):
        config_from_hf({**d, "hidden_act": "gelu"})
    old = {k: v for k, v in d.items() if k not in ("num_local_experts", "rope_parameters")}
    cfg = config_from_hf({**old, "num_experts": 8, "rope_theta": 1e6})      # transformers-4 spelling
    assert cfg.num_experts == 8 and cfg.rope_theta == 1e6


def test_missing_expert_is_a_clear_error(hf_models):
    hf = hf_models("mixtral")
    arch = get_arch("mixtral")
    cfg = arch.config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())                                              # stacked, as in memory
    sd.pop("model.layers.1.mlp.experts.down_proj")
    with pytest.raises(ModelLoadError, match="layer 1"):
        split_state_dict(arch, cfg, sd)
    sd = dict(hf.state_dict())
    sd["model.layers.0.mlp.experts.gate_up_proj"] = sd["model.layers.0.mlp.experts.gate_up_proj"][:, :-1]
    with pytest.raises(ModelLoadError, match="gate_up"):
        split_state_dict(arch, cfg, sd)
