"""The rules a model file's fields must follow, as data (applied by loading/validate.py; nothing here runs).

    Rule(kinds, ok, expect)   kinds: the value kinds accepted ("int", "float", "bool", "str", "null",
                              "[int]", "[float]", "[str]", "object"); ok(value) for each number (and for
                              each element of a numeric array) or None; expect: the text an error shows
    GGUF_KEYS                 GGUF metadata key ("{arch}." = the file's general.architecture) -> Rule
    HF_KEYS                   config.json key -> Rule (null is accepted for every key: the architecture's
                              config_from_hf decides which keys are required)
    GENERATION_KEYS           generation_config.json key -> Rule (the server's sampling defaults)
    HF_DTYPES                 the safetensors dtypes a weight may have
    KNOWN_GGUF_KEYS           every key the `gguf` package names (llama.cpp's list), "{arch}." prefixed
    GGUF_NAMESPACES           the first components a GGUF key may have ("{arch}" included)
    TOKEN_TYPES               llama.cpp's token types (0 undefined .. 6 byte)
    MIN_BITS                  the fewest bits one weight takes on disk, per format (bounds what a
                              config may make the loader allocate from a file of a given size)

An "int" is a JSON/GGUF integer (never a bool), a "float" a finite or infinite real number: ranges below
refuse NaN and infinities wherever a number reaches the model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

from gguf.constants import Keys


@dataclass(frozen=True)
class Rule:
    kinds: tuple[str, ...]
    ok: Callable[[float], bool] | None = None
    expect: str = ""


def _between(lo: float, hi: float, lo_open: bool = False) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi


SIZE = _between(1, 2**31)                 # widths, counts, lengths
LAYERS = _between(1, 4096)               # decoder layers (bounded before any per-layer loop)
COUNT0 = _between(0, 2**31)              # may be 0
ID = _between(0, 2**31 - 1)              # a token id (checked against the vocabulary later)
POSITIVE = _between(0, 1e30, lo_open=True)
EPS = _between(0, 1, lo_open=True)
FINITE = _between(-1e30, 1e30)

SIZE_RULE = Rule(("int",), SIZE, "an integer in [1, 2^31]")
COUNT0_RULE = Rule(("int",), COUNT0, "an integer in [0, 2^31]")
ID_RULE = Rule(("int",), ID, "a token id (integer >= 0)")
BOOL_RULE = Rule(("bool",), None, "a boolean")
STR_RULE = Rule(("str",), None, "a string")
POSITIVE_RULE = Rule(("float",), POSITIVE, "a finite number > 0")
EPS_RULE = Rule(("float",), EPS, "a finite number in (0, 1]")
PER_LAYER_SIZE = Rule(("int", "[int]"), SIZE, "an integer in [1, 2^31] (or one per layer)")

GGUF_KEYS: dict[str, Rule] = {
    "general.architecture": STR_RULE,
    "general.name": STR_RULE,
    "general.file_type": COUNT0_RULE,
    "general.quantization_version": COUNT0_RULE,
    "{arch}.context_length": SIZE_RULE,
    "{arch}.embedding_length": SIZE_RULE,
    "{arch}.block_count": Rule(("int",), LAYERS, "an integer in [1, 4096]"),
    "{arch}.vocab_size": SIZE_RULE,
    "{arch}.feed_forward_length": COUNT0_RULE,          # per-layer arrays: not supported by the models
    "{arch}.expert_feed_forward_length": SIZE_RULE,
    "{arch}.expert_shared_feed_forward_length": COUNT0_RULE,
    "{arch}.expert_count": COUNT0_RULE,
    "{arch}.expert_used_count": SIZE_RULE,
    "{arch}.expert_shared_count": COUNT0_RULE,
    "{arch}.expert_weights_norm": BOOL_RULE,
    "{arch}.expert_weights_scale": POSITIVE_RULE,
    "{arch}.leading_dense_block_count": COUNT0_RULE,
    "{arch}.attention.head_count": PER_LAYER_SIZE,
    "{arch}.attention.head_count_kv": PER_LAYER_SIZE,
    "{arch}.attention.key_length": SIZE_RULE,
    "{arch}.attention.value_length": SIZE_RULE,
    "{arch}.attention.layer_norm_rms_epsilon": EPS_RULE,
    "{arch}.attention.layer_norm_epsilon": EPS_RULE,
    "{arch}.attention.clamp_kqv": POSITIVE_RULE,
    "{arch}.attention.sliding_window": COUNT0_RULE,
    "{arch}.rope.dimension_count": SIZE_RULE,
    "{arch}.rope.freq_base": POSITIVE_RULE,
    "{arch}.rope.scaling.type": STR_RULE,
    "{arch}.rope.scaling.factor": POSITIVE_RULE,
    "tokenizer.ggml.model": STR_RULE,
    "tokenizer.ggml.pre": STR_RULE,
    "tokenizer.ggml.tokens": Rule(("[str]",), None, "an array of strings"),
    "tokenizer.ggml.token_type": Rule(("[int]",), _between(0, 6), "an array of token types (integers 0..6)"),
    "tokenizer.ggml.scores": Rule(("[float]",), FINITE, "an array of finite numbers"),
    "tokenizer.ggml.merges": Rule(("[str]",), None, "an array of strings"),
    "tokenizer.ggml.add_bos_token": BOOL_RULE,
    "tokenizer.ggml.add_eos_token": BOOL_RULE,
    "tokenizer.ggml.add_space_prefix": BOOL_RULE,
    "tokenizer.chat_template": STR_RULE,
    "split.no": COUNT0_RULE,
    "split.count": SIZE_RULE,
    "split.tensors.count": COUNT0_RULE,
    **{f"tokenizer.ggml.{t}_token_id": ID_RULE
       for t in ("bos", "eos", "eot", "eom", "padding", "unknown", "seperator", "cls", "mask", "prefix",
                 "suffix", "middle", "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")},
}
TOKEN_ID_KEYS = tuple(k for k in GGUF_KEYS if k.endswith("_token_id"))
TOKEN_TYPES = range(7)


def _gguf_key_names() -> frozenset[str]:
    names: set[str] = set()

    def walk(cls) -> None:
        for n, v in vars(cls).items():
            if isinstance(v, str) and not n.startswith("_"):
                names.add(v)
            elif inspect.isclass(v):
                walk(v)

    walk(Keys)
    return frozenset(names | set(GGUF_KEYS))


KNOWN_GGUF_KEYS = _gguf_key_names()
GGUF_NAMESPACES = frozenset({k.split(".")[0] for k in KNOWN_GGUF_KEYS} | {"quantize"})

# ---- Hugging Face config.json ----

INT_SIZE = Rule(("int", "null"), SIZE, "an integer in [1, 2^31]")
INT_COUNT0 = Rule(("int", "null"), COUNT0, "an integer in [0, 2^31]")
INT_ID = Rule(("int", "null"), ID, "a token id (integer >= 0)")
REAL_POSITIVE = Rule(("int", "float", "null"), POSITIVE, "a finite number > 0")
REAL_FINITE = Rule(("int", "float", "null"), FINITE, "a finite number")
BOOL_OR_NULL = Rule(("bool", "null"), None, "true or false (a JSON boolean, not a string)")
STR_OR_NULL = Rule(("str", "null"), None, "a string")

HF_KEYS: dict[str, Rule] = {
    "model_type": STR_OR_NULL, "hidden_act": STR_OR_NULL, "torch_dtype": STR_OR_NULL,
    "num_hidden_layers": Rule(("int", "null"), LAYERS, "an integer in [1, 4096]"),
    **{k: INT_SIZE for k in ("vocab_size", "hidden_size", "num_attention_heads",
                             "num_key_value_heads", "head_dim", "num_experts", "num_local_experts",
                             "num_experts_per_tok", "moe_intermediate_size", "max_position_embeddings",
                             "decoder_sparse_step", "sliding_window")},
    **{k: INT_COUNT0 for k in ("intermediate_size", "shared_expert_intermediate_size", "max_window_layers")},
    **{k: INT_ID for k in ("bos_token_id", "pad_token_id")},
    "eos_token_id": Rule(("int", "[int]", "null"), ID, "a token id or a list of token ids"),
    "rms_norm_eps": Rule(("int", "float", "null"), EPS, "a finite number in (0, 1]"),
    "rope_theta": REAL_POSITIVE, "clip_qkv": REAL_POSITIVE,
    "router_aux_loss_coef": REAL_FINITE, "initializer_range": REAL_FINITE, "attention_dropout": REAL_FINITE,
    **{k: BOOL_OR_NULL for k in ("tie_word_embeddings", "norm_topk_prob", "attention_bias",
                                 "use_sliding_window", "output_router_logits", "use_cache")},
    "rope_scaling": Rule(("object", "null"), None, "an object (or null)"),
    "rope_parameters": Rule(("object", "null"), None, "an object (or null)"),
    "mlp_only_layers": Rule(("[int]", "null"), COUNT0, "a list of layer indices"),
}

GENERATION_KEYS: dict[str, Rule] = {
    "bos_token_id": INT_ID, "pad_token_id": INT_ID, "eos_token_id": HF_KEYS["eos_token_id"],
    "temperature": Rule(("int", "float", "null"), _between(0, 100), "a finite number >= 0"),
    "top_p": Rule(("int", "float", "null"), _between(0, 1, lo_open=True), "a number in (0, 1]"),
    "min_p": Rule(("int", "float", "null"), _between(0, 1), "a number in [0, 1]"),
    "top_k": INT_COUNT0, "do_sample": BOOL_OR_NULL,
}

MIN_BITS = {"gguf": 1.5, "safetensors": 8.0}     # IQ1_S is 1.5625 bits per weight; HF floats >= 8 bits
HF_DTYPES = ("F32", "F16", "BF16")                # what a safetensors weight may be stored as
