"""Hugging Face checkpoint names -> our names, and helpers to read HF config.json dicts.

`rename(hf_name)` of an architecture returns one of:
    str        the dense weight's name in our MoETransformer (HF's own spelling, see docs/architecture.md)
    ExpertRef  a routed-expert tensor: (layer, expert, which)
    None       ignore (rotary inv_freq and other non-weights)

Two expert layouts exist in checkpoints and in transformers' in-memory state dicts:
    per expert  `model.layers.{i}.mlp.experts.{e}.gate_proj.weight` [I, D] (up_proj [I, D], down_proj [D, I];
                or the family's own block and matrix names, which its Architecture declares: `moe_block`,
                `hf_expert_names`; Mixtral `block_sparse_moe...w1/w3/w2`)  -> ExpertRef(i, e, which)
    stacked     `model.layers.{i}.mlp.experts.gate_up_proj` [E, 2I, D] (gate rows then up rows) and
                `...experts.down_proj` [E, D, I] (transformers>=5 modules)  -> ExpertRef(i, None, which)
                (separate stacked `experts.gate_proj` / `experts.up_proj` [E, I, D] map to "gate" / "up").
transformers 5.24's save_pretrained writes the per-expert layout; its modules hold the stacked one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from hotexperts.errors import ModelLoadError

WHICH = ("gate", "up", "down", "gate_up", "gate_bias", "up_bias", "gate_up_bias")   # *_bias: LayerExperts.b13
BASE_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_experts|num_local_experts", "num_experts_per_tok")


@dataclass(frozen=True)
class ExpertRef:
    layer: int
    expert: int | None       # None: a stacked 3-D tensor holding all experts of the layer
    which: str               # "gate" | "up" | "down" | "gate_up" | "gate_bias" | "up_bias" | "gate_up_bias"


WeightRef = str | ExpertRef | None
Renamer = Callable[[str], WeightRef]

HF_BLOCK = "mlp"                     # transformers>=5 modules' name of every architecture's MoE block
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")    # their per-expert matrices (gate, up, down)
_STACKED_WHICH = {"gate_up_proj": "gate_up", "down_proj": "down", "gate_proj": "gate", "up_proj": "up"}


def make_rename(moe_block: str = HF_BLOCK, expert_names: tuple[str, str, str] = EXPERT_NAMES) -> Renamer:
    """Build an architecture's rename() from what its Architecture declares: `moe_block`, our module name of
    the MoE block (the checkpoints' on-disk spelling), and `expert_names`, its per-expert HF matrices (gate,
    up, down). transformers>=5 spellings (`mlp`, gate_proj/up_proj/down_proj) are read for every
    architecture too."""
    blocks = "|".join(re.escape(b) for b in dict.fromkeys((HF_BLOCK, moe_block)))
    per_expert = re.compile(rf"^model\.layers\.(\d+)\.(?:{blocks})\.experts\.(\d+)\.(\w+)\.weight$")
    stacked = re.compile(rf"^model\.layers\.(\d+)\.(?:{blocks})\.experts\.(\w+?)(?:\.weight)?$")
    which_names = dict(zip(expert_names, ("gate", "up", "down"), strict=True))
    which_names |= dict(zip(EXPERT_NAMES, ("gate", "up", "down"), strict=True))

    def rename(hf_name: str) -> WeightRef:
        if hf_name.endswith("inv_freq"):
            return None
        if m := per_expert.match(hf_name):
            which = which_names.get(m.group(3))
            if which is None:
                raise ModelLoadError(f"unrecognised expert tensor name {hf_name!r}")
            return ExpertRef(int(m.group(1)), int(m.group(2)), which)
        if (m := stacked.match(hf_name)) and m.group(2) in _STACKED_WHICH:
            return ExpertRef(int(m.group(1)), None, _STACKED_WHICH[m.group(2)])
        return _block_alias(hf_name, moe_block)

    return rename


def _block_alias(name: str, moe_block: str) -> str:
    """The router under transformers>=5's block name (`mlp`) -> under ours, where they differ."""
    if moe_block != HF_BLOCK and f".{HF_BLOCK}.gate." in name:
        return name.replace(f".{HF_BLOCK}.gate.", f".{moe_block}.gate.")
    return name


# ---- config.json helpers ----

def require(d: dict, *keys: str, model_type: str = "") -> dict:
    """Raise ModelLoadError naming every missing key ("a|b": either spelling)."""
    missing = [k for k in keys if get_any(d, *k.split("|")) is None]
    if missing:
        what = model_type or "model"
        raise ModelLoadError(f"config.json of {what} lacks required key(s): {', '.join(missing)}")
    return d


def get_any(d: dict, *keys: str, default=None):
    """The first of `keys` present (not None) in d: transformers spells some keys two ways."""
    return next((d[k] for k in keys if d.get(k) is not None), default)


def num_experts(d: dict) -> int:
    return int(get_any(d, "num_experts", "num_local_experts"))


def rope_theta(d: dict, default: float) -> float:
    """rope theta from v5 `rope_parameters` or v4 `rope_theta`; only the default rope is implemented."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ModelLoadError(f"rope type {kind!r} is not supported (only the default rope is implemented)")
    return float(params.get("rope_theta") or d.get("rope_theta") or default)


def eos_ids(d: dict) -> tuple[int, ...]:
    eos = d.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


def common_fields(d: dict) -> dict:
    """ModelConfig fields every supported architecture reads the same way."""
    heads = int(d["num_attention_heads"])
    return dict(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
        top_k=int(d["num_experts_per_tok"]),
        max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids(d),
    )


def check_activation(d: dict) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act {act!r} is not supported (only silu)")
