"""GGUF (llama.cpp) tensor names <-> ours, the same for every architecture but for its MoE block's name.

    gguf_rename(gguf_name, moe_block="mlp", extra=None) -> our dense name | ExpertRef (stacked) | None
    gguf_name(our_name, moe_block="mlp", extra=None)    -> the GGUF name of one of our dense tensors
        extra: an architecture's own per-layer names, {GGUF "part.kind": our "module.param"} (e.g. qwen35moe's
        "ssm_a": "linear_attn.A_log", "post_attention_norm.weight": "post_attention_layernorm.weight"),
        looked up before the shared table (Architecture.gguf_names)
    expert_tensors(f, layer, which, E)      -> (names, stacked) of one MoE matrix ("gate" | "up" | "down")

Experts are stacked `blk.N.ffn_{gate,up,down}_exps.weight` [E, N, K] (GPT-OSS: `.bias` [E, N] beside them;
the down bias is a dense tensor of ours, declared by the architecture's own names), or one tensor per expert
`blk.N.ffn_{gate,up,down}.E.weight` [N, K] in Mixtral files converted before llama.cpp stacked them (2024).
`f` is anything with `name in f` and a `path` (loading/gguf_reader.GGUFFile): models/ reads no files.
"""

from __future__ import annotations

import re

from hotexperts.errors import HotExpertsError, ModelLoadError
from hotexperts.models.naming import ExpertRef

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",          # {moe}: MoE block
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm", "ffn_gate_inp": "{moe}.gate",
          "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
          "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_EXPS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
_PER_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")     # pre-2024 Mixtral files


_ANY_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_rename(name: str, moe_block: str = "mlp",
                extra: dict[str, str] | None = None) -> str | ExpertRef | None:
    """GGUF tensor name -> our dense name, an ExpertRef (stacked: expert=None), or None (unknown)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    if extra and (m := _ANY_BLK.match(name)) and m[2] in extra:
        return f"model.layers.{m[1]}.{extra[m[2]]}"
    if m := _PER_EXPERT.match(name):
        return ExpertRef(int(m[1]), int(m[3]), m[2])
    m = _BLK.match(name)
    if not m:
        return None
    layer, part, kind = int(m[1]), m[2], m[3]
    if part in _EXPS:                                   # .bias: GPT-OSS's expert gate/up (and down) biases
        return ExpertRef(layer, None, _EXPS[part] + ("" if kind == "weight" else "_bias"))
    if part not in _LAYER:
        return None
    return f"model.layers.{layer}.{_LAYER[part].format(moe=moe_block)}.{kind}"


def gguf_name(name: str, moe_block: str = "mlp", extra: dict[str, str] | None = None) -> str:
    """Our dense name -> GGUF's (the inverse of gguf_rename)."""
    for gguf, ours in _GLOBAL.items():
        if name == ours:
            return gguf
    _, _, layer, rest = name.split(".", 3)
    own = {ours: gguf for gguf, ours in (extra or {}).items()}
    if rest in own:
        return f"blk.{layer}.{own[rest]}"
    part, kind = rest.rsplit(".", 1)
    parts = {ours.format(moe=moe_block): gguf for gguf, ours in _LAYER.items()}
    if part not in parts:
        raise HotExpertsError(f"no GGUF name for tensor {name!r}")
    return f"blk.{layer}.{parts[part]}.{kind}"


def expert_tensors(f, layer: int, which: str, E: int) -> tuple[list[str], bool]:
    """(names, stacked): one stacked `ffn_{which}_exps` [E, N, K] or E per-expert `ffn_{which}.{e}` [N, K]."""
    stacked = f"blk.{layer}.ffn_{which}_exps.weight"
    if stacked in f:
        return [stacked], True
    per = [f"blk.{layer}.ffn_{which}.{e}.weight" for e in range(E)]
    if all(n in f for n in per):
        return per, False
    raise ModelLoadError(f"{f.path.name} lacks {stacked} (experts of MoE layer {layer})")
