"""Load a GGUF MoE model (llama.cpp's format) into a dense MoETransformer plus a host ExpertStore.

    lm = load_gguf(path, dtype="bfloat16", device=None, expert_scale_dtype="float16") -> LoadedModel
        path: file.gguf, or any shard of name-0000i-of-0000N.gguf (all shards are read)
    hf_config(GGUFFile) -> HF-style config dict;  gguf_rename(name, moe_block) -> str | ExpertRef | None
    gguf_tokenizer(GGUFFile) -> Tokenizer | None

Architectures (general.architecture -> ours): qwen3moe -> qwen3_moe, qwen2moe -> qwen2_moe,
llama with expert_count -> mixtral, olmoe -> olmoe; the architecture's config_from_hf builds the ModelConfig.
llama.cpp permutes the Q/K rows of `llama` models for its rope (qwen*/olmoe are not permuted); we undo it.
Experts: stacked `blk.N.ffn_{gate,up,down}_exps` [E, N, K], or per expert `blk.N.ffn_gate.E` (old Mixtral).
Experts stay quantized: per MoE matrix (w13 = gate+up, w2 = down), when every layer's tensors are
Q4_0/Q4_1/Q4_K they become int4g32; when they are Q8_0/Q5_0/Q5_1/Q5_K/Q6_K (possibly beside Q4 types, as in
Q4_K_M) they become int8g32, or int8g16 if any is Q6_K (both exact, loading/gguf_quants.py); otherwise that
matrix is dequantized to `dtype` in every layer (the slot pool holds one format per matrix across layers).
Dense weights are dequantized to `dtype` on `device`.
Tokenizer (built with `tokenizers`, checked against transformers' GGUF conversion in the tests):
    "gpt2"   byte-level BPE (tokens, merges) with the split regex named by tokenizer.ggml.pre
    "llama"  SentencePiece-style BPE with byte fallback; merges recovered from the scores
Control tokens become special added tokens, user-defined ones plain added tokens; chat template from
tokenizer.chat_template; bos/eos (and eot) ids from tokenizer.ggml.*.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from hotexperts.config import ModelConfig
from hotexperts.engine.load import LoadedModel, default_device, empty_model, materialize, parse_dtype
from hotexperts.errors import ModelLoadError, UnsupportedArchitectureError
from hotexperts.experts.store import ExpertStore
from hotexperts.loading import gguf_quants as gq
from hotexperts.loading.gguf_reader import GGUFFile
from hotexperts.models import get_arch
from hotexperts.models.naming import ExpertRef
from hotexperts.tokenizer import QWEN_PAT, Tokenizer, _bytes_to_unicode
from hotexperts.weights import LayerExperts, QuantizedWeight

GGUF_ARCHS = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "llama": "mixtral", "olmoe": "olmoe"}
NORM_TOPK = {"qwen3moe": True, "qwen2moe": False, "llama": True, "olmoe": False}   # llama.cpp's choices
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
EXPERT_CHUNK = 16          # experts converted at a time (bounds float temporaries)


def load_gguf(path: str | Path, dtype: str | torch.dtype = "bfloat16", device=None,
              expert_scale_dtype: str = "float16") -> LoadedModel:
    if expert_scale_dtype not in SCALE_DTYPES:
        raise ModelLoadError(f"expert_scale_dtype must be one of {', '.join(SCALE_DTYPES)}")
    f = GGUFFile(path)
    d = hf_config(f)
    cfg = get_arch(d["model_type"]).config_from_hf(d)
    dt, dev = parse_dtype(dtype), default_device(device)
    model = empty_model(cfg)
    dense = load_dense(f, cfg, model.state_dict(), dt, dev)
    experts = load_experts(f, cfg, dt, SCALE_DTYPES[expert_scale_dtype])
    tok = gguf_tokenizer(f)
    gen = {"bos_token_id": d.get("bos_token_id"), "eos_token_id": list(tok.eos_ids) if tok else None}
    gen = {k: v for k, v in gen.items() if v is not None}
    return LoadedModel(cfg, materialize(model, dense, dev), ExpertStore(experts), tok, gen, f.path, d)


# ---- metadata -> HF config dict ----

def _arch(f: GGUFFile) -> str:
    arch = f.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(GGUF_ARCHS))} "
            "(llama only with experts, i.e. Mixtral)")
    if not f.get(f"{arch}.expert_count"):
        raise UnsupportedArchitectureError(f"GGUF architecture {arch!r} without experts (a dense model) is "
                                           "not supported: this engine runs MoE models")
    return arch


def _one(v, what: str) -> int:
    """A per-layer array that must hold one value (e.g. head_count_kv), or a scalar."""
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise ModelLoadError(f"GGUF {what} varies across layers ({sorted(set(v))}); not supported")
        v = v[0]
    return int(v)


def hf_config(f: GGUFFile) -> dict:
    arch = _arch(f)
    A = lambda key, default=None: f.get(f"{arch}.{key}", default)  # noqa: E731
    need = [k for k in ("embedding_length", "block_count", "attention.head_count", "expert_used_count") if
            A(k) is None]
    if need or "token_embd.weight" not in f:
        raise ModelLoadError(f"{f.path.name} lacks GGUF metadata/tensors: {', '.join(need) or 'token_embd'}")
    L, D, H = int(A("block_count")), int(A("embedding_length")), _one(A("attention.head_count"), "head_count")
    moe = [i for i in range(L) if f"blk.{i}.ffn_gate_inp.weight" in f]          # layers with a router
    if not moe:
        raise ModelLoadError(f"{f.path.name} has no MoE layers (no blk.N.ffn_gate_inp.weight router)")
    E = f.info(f"blk.{moe[0]}.ffn_gate_inp.weight").shape[0]
    names, _ = expert_tensors(f, moe[0], "gate", E)
    I = f.info(names[0]).shape[-2]
    tok = lambda key: f.get(f"tokenizer.ggml.{key}")  # noqa: E731
    d = {"model_type": GGUF_ARCHS[arch], "hidden_act": "silu", "hidden_size": D, "num_hidden_layers": L,
         "num_attention_heads": H,
         "num_key_value_heads": _one(A("attention.head_count_kv", H), "head_count_kv"),
         "head_dim": int(A("attention.key_length") or D // H),
         "num_experts_per_tok": int(A("expert_used_count")),
         "vocab_size": f.info("token_embd.weight").shape[0],
         "max_position_embeddings": int(A("context_length", 4096)),
         "tie_word_embeddings": "output.weight" not in f,
         "rms_norm_eps": float(A("attention.layer_norm_rms_epsilon", 1e-6)),
         "rope_theta": float(A("rope.freq_base", 1e6 if arch == "llama" else 10000.0)),
         "norm_topk_prob": bool(A("expert_weights_norm", NORM_TOPK[arch])),
         "bos_token_id": tok("bos_token_id"), "eos_token_id": tok("eos_token_id")}
    _check_rope(f, arch, d)
    d["num_local_experts" if arch == "llama" else "num_experts"] = int(E)
    d.update(_arch_fields(f, arch, L, moe, int(I)))
    return d


def _check_rope(f: GGUFFile, arch: str, d: dict) -> None:
    kind = f.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        d["rope_scaling"] = {"rope_type": kind}      # config_from_hf names it in its error
    rot = f.get(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != d["head_dim"]:
        raise ModelLoadError(f"partial rotary embedding (rope.dimension_count {rot} < head_dim "
                             f"{d['head_dim']}) is not supported")


def _arch_fields(f: GGUFFile, arch: str, L: int, moe: list[int], I: int) -> dict:
    bias = "blk.0.attn_q.bias" in f
    if arch == "llama":
        return {"intermediate_size": I, "sliding_window": f.get("llama.attention.sliding_window")}
    if arch == "olmoe":
        clip = f.get("olmoe.attention.clamp_kqv")
        return {"intermediate_size": I, "attention_bias": bias,
                "clip_qkv": None if clip is None else float(clip)}
    out = {"moe_intermediate_size": I, "decoder_sparse_step": 1, "use_sliding_window": False,
           "mlp_only_layers": [i for i in range(L) if i not in moe],
           "intermediate_size": int(f.get(f"{arch}.feed_forward_length") or 0)}
    if arch == "qwen3moe":
        return {**out, "attention_bias": bias}
    shexp = f"blk.{moe[0]}.ffn_gate_shexp.weight"
    shared = f.info(shexp).shape[0] if shexp in f else 0
    return {**out, "qkv_bias": bias, "shared_expert_intermediate_size": shared}


# ---- tensor names ----

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm", "ffn_gate_inp": "{moe}.gate",
          "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
          "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_EXPS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
_PER_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")     # pre-2024 Mixtral files


def gguf_rename(name: str, moe_block: str = "mlp") -> str | ExpertRef | None:
    """GGUF tensor name -> our dense name, an ExpertRef (stacked: expert=None), or None (unknown)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    if m := _PER_EXPERT.match(name):
        return ExpertRef(int(m[1]), int(m[3]), m[2])
    m = _BLK.match(name)
    if not m:
        return None
    layer, part, kind = int(m[1]), m[2], m[3]
    if part in _EXPS and kind == "weight":
        return ExpertRef(layer, None, _EXPS[part])
    if part not in _LAYER:
        return None
    return f"model.layers.{layer}.{_LAYER[part].format(moe=moe_block)}.{kind}"


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert permute of Q/K rows (interleaved rope pairs -> HF halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_dense(f: GGUFFile, cfg: ModelConfig, shapes: dict, dt: torch.dtype, dev: torch.device) -> dict:
    """Every non-expert tensor, dequantized to dt on dev; missing ones raise one ModelLoadError."""
    moe_block = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
    out, ignored = {}, []
    for name in f.names():
        ref = gguf_rename(name, moe_block)
        if isinstance(ref, ExpertRef):
            continue
        if ref is None or ref not in shapes:
            ignored.append(name)
            continue
        info = f.info(name)
        w = gq.dequantize(f.raw(name), info.qtype, info.shape, name)
        if cfg.model_type == "mixtral" and re.search(r"\.attn_[qk]\.", name):
            w = _unpermute(w, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        want = tuple(shapes[ref].shape)
        if tuple(w.shape) != want:
            if w.numel() != shapes[ref].numel():     # ffn_gate_inp_shexp is [D] in GGUF, [1, D] for us
                raise ModelLoadError(f"tensor {name!r} has shape {list(w.shape)}, expected {list(want)}")
            w = w.reshape(want)
        out[ref] = w.to(device=dev, dtype=dt)
    missing = [k for k in shapes if k not in out]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{f.path.name} lacks tensor(s) for: {', '.join(missing[:5])}{more}")
    if ignored:
        warnings.warn(f"ignored {len(ignored)} GGUF tensor(s) not used by the model, e.g. {ignored[0]!r}",
                      stacklevel=3)
    return out


# ---- experts ----

def expert_tensors(f: GGUFFile, layer: int, which: str, E: int) -> tuple[list[str], bool]:
    """(names, stacked): one stacked `ffn_{which}_exps` [E, N, K], or E per-expert `ffn_{which}.{e}` [N, K]
    (Mixtral files converted before llama.cpp stacked experts in 2024)."""
    stacked = f"blk.{layer}.ffn_{which}_exps.weight"
    if stacked in f:
        return [stacked], True
    per = [f"blk.{layer}.ffn_{which}.{e}.weight" for e in range(E)]
    if all(n in f for n in per):
        return per, False
    raise ModelLoadError(f"{f.path.name} lacks {stacked} (experts of MoE layer {layer})")


def _check_expert(f: GGUFFile, cfg: ModelConfig, layer: int, which: str):
    E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    names, stacked = expert_tensors(f, layer, which, E)
    want = (D, I) if which == "down" else (I, D)
    types = set()
    for name in names:
        info = f.info(name)
        if info.shape != ((E, *want) if stacked else want):
            raise ModelLoadError(f"tensor {name!r} has shape {list(info.shape)}, expected "
                                 f"{list((E, *want) if stacked else want)}")
        gq.check_supported(info.qtype, name)
        types.add(info.qtype)
    if len(types) > 1:
        raise ModelLoadError(f"layer {layer}: experts' {which} tensors mix {sorted(t.name for t in types)}")
    return types.pop()


def expert_formats(f: GGUFFile, cfg: ModelConfig) -> dict[str, str | None]:
    """{"w13": fmt, "w2": fmt}, fmt "q4_k" | "int4g32" | "int8g32" | "int8g16" (| "+zero" for int8g with a
    zero) or None (dequantized): the exact quantized format every layer's tensors of that matrix map onto.
    A matrix that is Q4_K in every layer stays in the file's Q4_K blocks ("q4_k", 4.5 bits per weight; Q4_K
    rows are whole 256-weight blocks by definition); Q4_0/Q4_1, or Q4_K beside them, become int4g32 (5 bits);
    Q4_K beside 5/6/8-bit types (Q4_K_M's Q6_K down matrices) int8gG."""
    types = {w: {_check_expert(f, cfg, l, w) for l in cfg.moe_layers} for w in ("gate", "up", "down")}
    kinds = {"w13": types["gate"] | types["up"], "w2": types["down"]}
    return {m: _format_of(m, k) for m, k in kinds.items()}


def _format_of(matrix: str, kinds: set) -> str | None:
    if kinds == {gq.Q.Q4_K}:
        return "q4_k"
    if kinds <= set(gq.FAST_TYPES):
        return "int4g32"
    spec = gq.int8_spec(kinds) if gq.Q.MXFP4 not in kinds or len(kinds) == 1 else None   # see _scale_dtype
    if spec is not None:
        return f"int8g{spec[0]}" + ("+zero" if spec[1] else "")
    if kinds & (set(gq.FAST_TYPES) | set(gq.INT8_TYPES)):
        warnings.warn(f"GGUF experts {matrix} mix {sorted(t.name for t in kinds)} across layers; every "
                      f"layer's {matrix} is dequantized (one slot format per matrix)", stacklevel=4)
    return None


def _raw_chunk(f: GGUFFile, names: list[str], stacked: bool, e: int) -> np.ndarray:
    """Experts e .. e + EXPERT_CHUNK of one matrix as block bytes [n, N, bytes] (or floats [n, N, K])."""
    if stacked:
        return f.raw(names[0])[e:e + EXPERT_CHUNK]
    return np.stack([f.raw(n) for n in names[e:e + EXPERT_CHUNK]])


def _convert(f: GGUFFile, cfg: ModelConfig, layer: int, which: str, fmt: str | None, dt, sdt,
             view: bool = False):
    """One layer's experts of `which` [E, N, K] in `fmt` (expert_formats) or as a dt tensor (None),
    EXPERT_CHUNK experts at a time. q4_k: the file's bytes, copied, or with view=True a view of the memory
    map (for a caller that concatenates it, i.e. copies it, next)."""
    names, stacked = expert_tensors(f, layer, which, cfg.num_experts)
    info = f.info(names[0])
    if fmt == "q4_k":                           # the file's bytes: no conversion, no chunks
        w = gq.to_q4_k(f.raw(names[0]) if stacked else np.stack([f.raw(n) for n in names]))
        return w if view else _cat([w], 0)
    rows = info.shape[1:] if stacked else info.shape                   # [N, K]
    parts = []
    for e in range(0, cfg.num_experts, EXPERT_CHUNK):
        chunk = _raw_chunk(f, names, stacked, e)
        if fmt == "int4g32":
            parts.append(gq.to_int4g32(chunk, info.qtype, sdt))
        elif fmt is not None:
            parts.append(gq.to_int8g(chunk, info.qtype, int(fmt[5:7]), fmt.endswith("+zero"),
                                     _scale_dtype(info.qtype, sdt)))
        else:
            parts.append(gq.dequantize(chunk, info.qtype, (len(chunk), *rows), names[0]).to(dt))
    return _cat(parts, 0)


def _scale_dtype(qtype, sdt: torch.dtype) -> torch.dtype:
    """MXFP4 scales are powers of two from 2^-149 to 2^127: bf16 holds every one exactly, fp16 does not. A
    matrix is MXFP4 in every layer or dequantized (_format_of), so its scale dtype is uniform."""
    return torch.bfloat16 if qtype == gq.Q.MXFP4 and sdt == torch.float16 else sdt


def _cat(ws: list, dim: int):
    """A new tensor (torch.cat copies, one part or many): never a view of the file's memory map. Parts that
    are None (q4_k's scale and zero) stay None."""
    if isinstance(ws[0], QuantizedWeight):
        q, s, z = (None if getattr(ws[0], k) is None else torch.cat([getattr(w, k) for w in ws], dim)
                   for k in ("q", "scale", "zero"))
        return QuantizedWeight(ws[0].fmt, q, s, z)
    return torch.cat(ws, dim)


def load_experts(f: GGUFFile, cfg: ModelConfig, dt: torch.dtype, sdt: torch.dtype) -> dict[int, LayerExperts]:
    fmt = expert_formats(f, cfg)
    out = {}
    for l in cfg.moe_layers:
        gate, up = (_convert(f, cfg, l, w, fmt["w13"], dt, sdt, view=True) for w in ("gate", "up"))
        out[l] = LayerExperts(_cat([gate, up], 1), _convert(f, cfg, l, "down", fmt["w2"], dt, sdt))
    return out


# ---- tokenizer ----

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"qwen2": QWEN_PAT, "deepseek-r1-qwen": QWEN_PAT, "llama-bpe": LLAMA3_PAT, "llama3": LLAMA3_PAT,
              "llama-v3": LLAMA3_PAT, "dbrx": LLAMA3_PAT, "smaug-bpe": LLAMA3_PAT}
GPT2_PRE = ("default", "gpt-2", "gpt2", "olmo")            # GPT-2's own split regex (ByteLevel's)
CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2


def gguf_tokenizer(f: GGUFFile) -> Tokenizer | None:
    kind = f.get("tokenizer.ggml.model")
    if kind is None:
        return None
    tokens = f.get("tokenizer.ggml.tokens") or []
    types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        hf = _byte_bpe(tokens, f.get("tokenizer.ggml.merges") or [], f.get("tokenizer.ggml.pre", "default"))
    elif kind == "llama":
        hf = _sentencepiece(f, tokens, types)
    else:
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2, llama")
    _add_special(hf, tokens, types, byte_level=kind == "gpt2")
    tid = lambda key: f.get(f"tokenizer.ggml.{key}_token_id")  # noqa: E731
    name = lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else None  # noqa: E731
    cfg = {"bos_token": name(tid("bos")), "eos_token": name(tid("eos")), "pad_token": name(tid("padding")),
           "unk_token": name(tid("unknown")), "chat_template": f.get("tokenizer.chat_template"),
           "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", kind == "llama"))}
    eos = [i for i in (tid("eos"), tid("eot")) if i is not None]
    return Tokenizer(hf, cfg, {"eos_token_id": eos, "bos_token_id": tid("bos")})


def _byte_bpe(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    b2u = _bytes_to_unicode()
    alphabet = set(b2u.values())
    vocab = {t if set(t) <= alphabet else "".join(b2u[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    hf = HFTokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=False))
    if pre in PRE_SPLITS:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in GPT2_PRE:
            warnings.warn(f"GGUF pre-tokenizer {pre!r} is unknown; using GPT-2's split regex", stacklevel=3)
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece vocabulary implies: each split of a token into two tokens, best score first."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for tok, score in zip(tokens, scores, strict=True):
        pairs = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ids and tok[i:] in ids]
        found += [(a, b, score) for a, b in sorted(pairs, key=lambda p: (ids[p[0]], ids[p[1]]))]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _sentencepiece(f: GGUFFile, tokens: list[str], types: list[int]) -> HFTokenizer:
    scores = f.get("tokenizer.ggml.scores")
    if scores is None:
        raise ModelLoadError(f"{f.path.name}: SentencePiece vocabulary without tokenizer.ggml.scores")
    unk = f.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, spm_merges(tokens, scores),
                     unk_token=tokens[unk] if unk is not None else None, fuse_unk=True, byte_fallback=True)
    hf = HFTokenizer(bpe)
    prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return hf


def _add_special(hf: HFTokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    alphabet = set(_bytes_to_unicode().values())
    ok = (lambda t: set(t) <= alphabet) if byte_level else (lambda t: True)
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=False)
               if k in (CONTROL, UNKNOWN) and ok(t)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=False)
            if k == USER_DEFINED]
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)
