"""Validation of what a model file says, before anything is allocated from it: one owner for the rules.

    check_gguf_metadata(path, metadata, kinds)   types and ranges per key (schema.GGUF_KEYS), the
                                                 tokenizer arrays' lengths and token ids inside the vocabulary
    check_gguf_model(f, arch)                    keys known to the architecture's namespace, block_count vs
                                                 the blk.N tensors, top-k <= experts, heads divide
    check_hf_config(path, config)                config.json types and ranges (schema.HF_KEYS)
    check_generation_config(path, config)        generation_config.json (schema.GENERATION_KEYS)
    check_model_config(cfg, where, nbytes, fmt)  a ModelConfig's ranges, and the weights it describes fit
                                                 in the `nbytes` of the files (schema.MIN_BITS per format)
    kind_of(json_value)                          "int" | "float" | "bool" | "str" | "null" | "[int]" | ...

Every failure raises one ModelLoadError: "<file>: <field> must be <expected>, got <value>". The rules are
data in loading/schema.py; this module applies them. It reads no tensor data.
"""

from __future__ import annotations

import math
import re

from hotexperts.config import ModelConfig
from hotexperts.errors import ModelLoadError
from hotexperts.loading import schema
from hotexperts.loading.schema import Rule

_BLK = re.compile(r"^blk\.(\d+)\.")


def fail(where, field: str, expect: str, got) -> ModelLoadError:
    shown = repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ModelLoadError(f"{where}: {field} must be {expect}, got {shown}")


def kind_of(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        kinds = {kind_of(x) for x in v}
        if kinds <= {"int"}:
            return "[int]"
        return f"[{kinds.pop()}]" if len(kinds) == 1 else "[mixed]"
    return type(v).__name__


def check_value(where, key: str, kind: str, value, rule: Rule) -> None:
    """`value` (of `kind`) follows `rule`; numbers (and numeric arrays' elements) pass rule.ok."""
    if kind not in rule.kinds:
        shown = value if kind != "[str]" else kind
        raise fail(where, key, f"{rule.expect} ({' or '.join(rule.kinds)})", shown)
    if rule.ok is None or kind in ("null", "str", "bool", "object"):
        return
    for x in value if isinstance(value, list) else (value,):
        if not rule.ok(x):
            raise fail(where, key, rule.expect, x)


# ---- GGUF ----

def check_gguf_metadata(path, metadata: dict, kinds: dict[str, str]) -> None:
    arch = metadata.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    for key, value in metadata.items():
        generic = "{arch}" + key[len(arch):] if arch and key.startswith(arch + ".") else key
        rule = schema.GGUF_KEYS.get(generic)
        if rule is not None:
            check_value(path, key, kinds[key], value, rule)
    _check_vocab(path, metadata)


def _check_vocab(path, m: dict) -> None:
    tokens = m.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    n = len(tokens)
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in m and len(m[key]) != n:
            raise fail(path, key, f"one entry per token ({n})", f"{len(m[key])} entries")
    for key in schema.TOKEN_ID_KEYS:
        if m.get(key) is not None and not 0 <= m[key] < n:
            raise fail(path, key, f"a token id in [0, {n}) (the vocabulary)", m[key])
    for i, merge in enumerate(m.get("tokenizer.ggml.merges") or ()):
        a, _, b = merge.partition(" ")
        if not a or not b:
            raise fail(path, f"tokenizer.ggml.merges[{i}]", "two tokens separated by a space", merge)


def check_gguf_model(f, arch: str) -> None:
    """The file as a model of `arch` (f: loading/gguf_reader.GGUFFile). A file without expert_count is
    left to models/gguf_config.GGUFConfig (it names dense models)."""
    meta, path = f.metadata, f.path
    for key in meta:
        ns = key.split(".", 1)[0]
        if ns == arch:
            if "{arch}" + key[len(arch):] not in schema.KNOWN_GGUF_KEYS:
                raise fail(path, key, f"a key llama.cpp knows for {arch!r} (misspelt or corrupted?)", key)
        elif ns not in schema.GGUF_NAMESPACES:
            raise fail(path, key, f"in a known namespace ({arch}, general, tokenizer, split, ...)", key)
    key = lambda k: meta.get(f"{arch}.{k}")  # noqa: E731
    if not key("expert_count"):
        return
    _check_blocks(f, arch, key("block_count"))
    used, experts = key("expert_used_count"), key("expert_count")
    if used is not None and used > experts:
        raise fail(path, f"{arch}.expert_used_count", f"<= {arch}.expert_count ({experts})", used)
    _check_heads(path, arch, key)


def _check_blocks(f, arch: str, n: int | None) -> None:
    if n is None:
        return
    blocks = set()
    for name in f.names():
        if m := _BLK.match(name):
            blocks.add(int(m[1]))
            if int(m[1]) >= n:
                raise fail(f.path, f"{arch}.block_count", f"> {m[1]} (tensor {name!r} exists)", n)
    if len(blocks) != n:
        first = next(i for i in range(n) if i not in blocks)
        raise fail(f.path, f"{arch}.block_count", f"the number of blocks with tensors (blk.{first}.* is "
                   "missing)", n)


def _check_heads(path, arch: str, key) -> None:
    heads, kv = key("attention.head_count"), key("attention.head_count_kv")
    hs = heads if isinstance(heads, list) else [heads]
    kvs = (kv if isinstance(kv, list) else [kv] * len(hs)) if kv is not None else hs
    if heads is None or len(kvs) != len(hs):
        return
    for h, k in zip(hs, kvs, strict=True):
        if h % k:
            raise fail(path, f"{arch}.attention.head_count_kv", f"a divisor of head_count ({h})", k)
    width = key("embedding_length")
    if key("attention.key_length") is None and width is not None and width % hs[0]:
        raise fail(path, f"{arch}.attention.head_count", f"a divisor of embedding_length ({width})", hs[0])


# ---- Hugging Face config.json ----

def check_hf_config(path, config: dict) -> None:
    for key, rule in schema.HF_KEYS.items():
        if key in config:
            check_value(path, key, kind_of(config[key]), config[key], rule)


def check_generation_config(path, config: dict) -> None:
    for key, rule in schema.GENERATION_KEYS.items():
        if key in config:
            check_value(path, key, kind_of(config[key]), config[key], rule)


# ---- the ModelConfig, whatever its source ----

def check_model_config(cfg: ModelConfig, where, nbytes: int, fmt: str) -> None:
    """Ranges a ModelConfig must satisfy, then the size bound: the weights it describes must fit in the
    files' `nbytes` at schema.MIN_BITS[fmt] bits each (so nothing larger than the file is allocated)."""
    for field, ok, expect in _config_rules(cfg):
        if not ok:
            raise fail(where, field, expect, getattr(cfg, field))
    weights = min_weights(cfg)
    if weights * schema.MIN_BITS[fmt] > 8 * nbytes:
        raise ModelLoadError(f"{where}: the config describes {weights:,} weights (hidden_size "
                             f"{cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_experts} experts, vocab "
                             f"{cfg.vocab_size}), more than the weight files' {nbytes:,} bytes can hold")


def _config_rules(c: ModelConfig) -> list[tuple[str, bool, str]]:
    finite_pos = lambda v: isinstance(v, int | float) and math.isfinite(v) and v > 0  # noqa: E731
    in_vocab = lambda i: 0 <= i < c.vocab_size  # noqa: E731
    return [
        ("vocab_size", c.vocab_size >= 1, ">= 1"), ("hidden_size", c.hidden_size >= 1, ">= 1"),
        ("num_layers", c.num_layers >= 1, ">= 1"), ("num_heads", c.num_heads >= 1, ">= 1"),
        ("num_kv_heads", c.num_kv_heads >= 1 and c.num_heads % c.num_kv_heads == 0,
         f"a divisor of the number of attention heads ({c.num_heads})"),
        ("head_dim", c.head_dim >= 2 and c.head_dim % 2 == 0, "an even number >= 2 (rotary embedding)"),
        ("num_experts", c.num_experts >= 1, ">= 1"),
        ("top_k", 1 <= c.top_k <= c.num_experts, f"in [1, the number of experts ({c.num_experts})]"),
        ("moe_intermediate_size", c.moe_intermediate_size >= 1, ">= 1"),
        ("moe_layers", bool(c.moe_layers) and all(0 <= i < c.num_layers for i in c.moe_layers),
         f"a non-empty set of layers in [0, {c.num_layers})"),
        ("intermediate_size", c.intermediate_size >= 1 or len(c.moe_layers) == c.num_layers,
         ">= 1 (the model has dense MLP layers)"),
        ("rms_norm_eps", finite_pos(c.rms_norm_eps) and c.rms_norm_eps <= 1, "a finite number in (0, 1]"),
        ("rope_theta", finite_pos(c.rope_theta), "a finite number > 0"),
        ("max_position_embeddings", c.max_position_embeddings >= 1, ">= 1"),
        ("clip_qkv", c.clip_qkv is None or finite_pos(c.clip_qkv), "a finite number > 0"),
        ("bos_token_id", c.bos_token_id is None or (type(c.bos_token_id) is int and in_vocab(c.bos_token_id)),
         f"a token id in [0, {c.vocab_size})"),
        ("eos_token_ids", all(in_vocab(i) for i in c.eos_token_ids), f"token ids in [0, {c.vocab_size})"),
    ]


def min_weights(c: ModelConfig) -> int:
    """The fewest weights a file of this config holds (embedding, attention, experts, dense MLPs)."""
    D, L, moe = c.hidden_size, c.num_layers, len(c.moe_layers)
    attention = L * D * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    experts = moe * c.num_experts * 3 * c.moe_intermediate_size * D
    dense = (L - moe) * 3 * D * c.intermediate_size + moe * 3 * D * c.shared_expert_intermediate_size
    return c.vocab_size * D + attention + experts + dense
