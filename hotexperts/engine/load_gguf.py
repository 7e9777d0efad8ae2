"""Load a GGUF MoE model (llama.cpp's format) into a dense MoETransformer plus a host ExpertStore.

    lm = load_gguf(path, dtype="bfloat16", device=None, expert_scale_dtype="float16") -> LoadedModel
        path: file.gguf, or any shard of name-0000i-of-0000N.gguf (all shards are read)
    gguf_tokenizer(GGUFFile) -> Tokenizer | None

Architecture-agnostic: general.architecture picks the Architecture (models.get_gguf_arch); its
hf_from_gguf(GGUFConfig) gives the HF-style config dict (kept as LoadedModel.hf_config), its config_from_hf
the ModelConfig, its from_gguf hook fixes dense tensors (Mixtral: llama.cpp's Q/K row permutation undone).
Tensor names: models/gguf_names.py (experts stacked `blk.N.ffn_{gate,up,down}_exps` [E, N, K], or per
expert `blk.N.ffn_gate.E` in old Mixtral files).
Experts stay quantized: per MoE matrix (w13 = gate+up, w2 = down), when every layer's tensors are
Q4_0/Q4_1/Q4_K they become int4g32; when they are Q8_0/Q5_0/Q5_1/Q5_K/Q6_K (possibly beside Q4 types, as in
Q4_K_M) they become int8g32, or int8g16 if any is Q6_K (both exact, loading/gguf_quants.py); otherwise that
matrix is dequantized to `dtype` in every layer (the slot pool holds one format per matrix across layers).
Dense weights: the projections (attention, dense and shared-expert MLPs, LM head) whose GGUF type maps
exactly onto int8gG (Q8_0, Q5_*, Q6_K, Q4_*: loading/gguf_quants.int8_spec) stay quantized on `device`
(models/qlinear.QuantLinear: int8 with a scale per 32 or 16 columns, 8.5-9 bits per weight, as llama.cpp keeps
Q8_0 there) unless dense_quant="dequantize"; routers, norms and float tensors are dequantized to `dtype`.
The token embedding stays in host memory when `host_embedding` (models/transforms.host_embedding; the
engine's default on CUDA for untied embeddings): rows are gathered per step, as llama.cpp does.
Tokenizer (built with `tokenizers`, checked against transformers' GGUF conversion in the tests):
    "gpt2"   byte-level BPE (tokens, merges) with the split regex named by tokenizer.ggml.pre
    "llama"  SentencePiece-style BPE with byte fallback; merges recovered from the scores
Control tokens become special added tokens, user-defined ones plain added tokens; chat template from
tokenizer.chat_template; bos/eos (and eot) ids from tokenizer.ggml.*.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from hotexperts.config import ModelConfig
from hotexperts.engine.load import (
    EMBEDDING,
    LoadedModel,
    default_device,
    empty_model,
    materialize,
    parse_dtype,
)
from hotexperts.errors import ModelLoadError, about
from hotexperts.experts.store import ExpertStore
from hotexperts.loading import gguf_quants as gq
from hotexperts.loading import validate
from hotexperts.loading.gguf_reader import GGUFFile
from hotexperts.models import Architecture, get_gguf_arch
from hotexperts.models.gguf_config import GGUFConfig
from hotexperts.models.gguf_names import expert_tensors, gguf_rename
from hotexperts.models.naming import ExpertRef
from hotexperts.models.qlinear import quantizable_linears, quantize_linears
from hotexperts.models.split import expert_act
from hotexperts.models.transforms import host_embedding as model_host_embedding
from hotexperts.tokenizer import QWEN_PAT, Tokenizer, _bytes_to_unicode
from hotexperts.weights import LUT4_BLOCKS, LayerExperts, QuantizedWeight

SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
EXPERT_CHUNK = 16          # experts converted at a time (bounds float temporaries)


DENSE_QUANT = ("keep", "dequantize")


def load_gguf(path: str | Path, dtype: str | torch.dtype = "bfloat16", device=None,
              expert_scale_dtype: str = "float16", dense_quant: str = "keep",
              host_embedding: bool = False) -> LoadedModel:
    if expert_scale_dtype not in SCALE_DTYPES:
        raise ModelLoadError(f"expert_scale_dtype must be one of {', '.join(SCALE_DTYPES)}")
    if dense_quant not in DENSE_QUANT:
        raise ModelLoadError(f"dense_quant must be one of {', '.join(DENSE_QUANT)}")
    with about(path):                                  # every error names the file
        return _load_gguf(path, dtype, device, expert_scale_dtype, dense_quant, host_embedding)


def _load_gguf(path, dtype, device, expert_scale_dtype: str, dense_quant: str,
               host_embedding: bool) -> LoadedModel:
    f = GGUFFile(path)
    arch = get_gguf_arch(f.get("general.architecture"))
    validate.check_gguf_model(f, arch.gguf_arch)
    d = arch.hf_from_gguf(GGUFConfig(f, arch.gguf_arch))
    cfg = arch.config_from_hf(d)
    validate.check_model_config(cfg, f.path, f.nbytes, "gguf")
    dt, dev = parse_dtype(dtype), default_device(device)
    model = empty_model(cfg)
    quant = dense_formats(f, arch, model) if dense_quant == "keep" else {}
    for (fmt, zero), names in _by_format(quant).items():
        quantize_linears(model, names, fmt, zero)
    host = host_embedding and not cfg.tie_word_embeddings
    dense = load_dense(f, arch, cfg, model.state_dict(), dt, dev, quant, {EMBEDDING} if host else set())
    experts = load_experts(f, cfg, dt, SCALE_DTYPES[expert_scale_dtype])
    tok = gguf_tokenizer(f)
    gen = {"bos_token_id": d.get("bos_token_id"), "eos_token_id": list(tok.eos_ids) if tok else None}
    gen = {k: v for k, v in gen.items() if v is not None}
    model = materialize(model, dense, dev)
    if host:
        model_host_embedding(model, dev)
    return LoadedModel(cfg, model, ExpertStore(experts), tok, gen, f.path, d)


def dense_formats(f: GGUFFile, arch: Architecture, model) -> dict[str, tuple[str, bool]]:
    """{linear module name: (int8gG format, with zero)} for the quantizable projections whose GGUF type maps
    exactly onto int8gG (models/qlinear.quantizable_linears)."""
    names = set(quantizable_linears(model))
    out = {}
    for name in f.names():
        ref = gguf_rename(name, arch.moe_block, arch.gguf_names)
        if not isinstance(ref, str) or not ref.endswith(".weight") or ref[:-7] not in names:
            continue
        qtype = f.info(name).qtype
        spec = gq.int8_spec({qtype}) if qtype != gq.Q.MXFP4 else None
        if spec is not None and f.info(name).shape[-1] % spec[0] == 0:
            out[ref[:-7]] = (f"int8g{spec[0]}", spec[1])
    return out


def _by_format(quant: dict[str, tuple[str, bool]]) -> dict[tuple[str, bool], list[str]]:
    groups: dict[tuple[str, bool], list[str]] = {}
    for name, spec in quant.items():
        groups.setdefault(spec, []).append(name)
    return groups


def _quantized(f: GGUFFile, arch: Architecture, cfg: ModelConfig, name: str, ref: str, spec, dev) -> dict:
    """A quantized projection's tensors {ref.q, ref.scale (, ref.zero)} on dev, exact (gguf_quants.to_int8g);
    the architecture's row fix-ups (Mixtral's Q/K permutation) applied to every part alike."""
    info, (fmt, zero) = f.info(name), spec
    qw = gq.to_int8g(f.raw(name), info.qtype, int(fmt[5:]), zero)
    prefix = ref[:-len("weight")]
    parts = {"q": qw.q, "scale": qw.scale, "zero": qw.zero}
    return {prefix + k: arch.from_gguf(cfg, ref, t).to(dev) for k, t in parts.items() if t is not None}


def _mtp_block(name: str, cfg: ModelConfig) -> bool:
    """A tensor of the MTP blocks llama.cpp appends after the decoder (blk.{L >= layers}: `block_count`
    counts them, `nextn_predict_layers` says how many; validate.check_gguf_model bounds L): left out."""
    head, _, rest = name.partition(".")
    idx = rest.partition(".")[0]
    return head == "blk" and idx.isdigit() and int(idx) >= cfg.num_layers


def load_dense(f: GGUFFile, arch: Architecture, cfg: ModelConfig, shapes: dict, dt: torch.dtype,
               dev: torch.device, quant: dict | None = None, host: set[str] = frozenset()) -> dict:
    """Every non-expert tensor on dev: the projections in `quant` ({module: (format, zero)}) quantized,
    the rest dequantized to dt; names in `host` stay in (CPU) memory. Missing ones, and tensors the model
    does not have, raise one ModelLoadError."""
    out, quant, mtp = {}, quant or {}, []
    for name in f.names():
        ref = gguf_rename(name, arch.moe_block, arch.gguf_names)
        if _mtp_block(name, cfg):
            mtp.append(name)
            continue
        if isinstance(ref, ExpertRef):
            continue
        if isinstance(ref, str) and ref.endswith(".weight") and ref[:-7] in quant:
            out.update(_quantized(f, arch, cfg, name, ref, quant[ref[:-7]], dev))
            continue
        if ref is None or ref not in shapes:
            raise ModelLoadError(f"{f.path}: tensor {name!r} is not one this {arch.gguf_arch} model has "
                                 "(llama.cpp refuses such files too: a corrupted name would go unused)")
        info = f.info(name)
        w = arch.from_gguf(cfg, ref, gq.dequantize(f.raw(name), info.qtype, info.shape, name))
        want = tuple(shapes[ref].shape)
        if tuple(w.shape) != want:
            if w.numel() != shapes[ref].numel():     # ffn_gate_inp_shexp is [D] in GGUF, [1, D] for us
                raise ModelLoadError(f"tensor {name!r} has shape {list(w.shape)}, expected {list(want)}")
            w = w.reshape(want)
        out[ref] = w.to(device="cpu" if ref in host else dev, dtype=dt)
    missing = [k for k in shapes if k not in out]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{f.path.name} lacks tensor(s) for: {', '.join(missing[:5])}{more}")
    if mtp:
        warnings.warn(f"ignored {len(mtp)} GGUF tensor(s) of the MTP block(s) after the decoder "
                      f"(nextn_predict_layers), e.g. {mtp[0]!r}", stacklevel=3)
    return out


# ---- experts ----

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
    if gq.native_format(kinds):                 # MXFP4 / IQ4_NL / IQ4_XS in every layer: the file's blocks
        return gq.native_format(kinds)
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
    if fmt == "q4_k" or fmt in LUT4_BLOCKS:     # the file's bytes: no conversion, no chunks
        raw = f.raw(names[0]) if stacked else np.stack([f.raw(n) for n in names])
        w = gq.to_q4_k(raw) if fmt == "q4_k" else gq.to_lut4(raw, info.qtype)
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
        out[l] = LayerExperts(_cat([gate, up], 1), _convert(f, cfg, l, "down", fmt["w2"], dt, sdt),
                              _gate_up_bias(f, cfg, l, dt), expert_act(cfg))
    return out


def _gate_up_bias(f: GGUFFile, cfg: ModelConfig, layer: int, dt: torch.dtype) -> torch.Tensor | None:
    """b13 [E, 2I] from `ffn_gate_exps.bias` and `ffn_up_exps.bias` [E, I] (GPT-OSS), or None."""
    if not cfg.expert_bias:
        return None
    parts = []
    for which in ("gate", "up"):
        name = f"blk.{layer}.ffn_{which}_exps.bias"
        if name not in f:
            raise ModelLoadError(f"{f.path.name} lacks {name} (expert biases of MoE layer {layer})")
        info = f.info(name)
        parts.append(gq.dequantize(f.raw(name), info.qtype, info.shape, name).to(dt))
    return torch.cat(parts, -1)


# ---- tokenizer ----

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"qwen2": QWEN_PAT, "deepseek-r1-qwen": QWEN_PAT, "llama-bpe": LLAMA3_PAT, "llama3": LLAMA3_PAT,
              "llama-v3": LLAMA3_PAT, "dbrx": LLAMA3_PAT, "smaug-bpe": LLAMA3_PAT}
GPT2_PRE = ("default", "gpt-2", "gpt2", "olmo")            # GPT-2's own split regex (ByteLevel's)
CONTROL, USER_DEFINED, UNKNOWN, UNUSED = 3, 4, 2, 5


def gguf_tokenizer(f: GGUFFile) -> Tokenizer | None:
    """The file's tokenizer; a vocabulary the `tokenizers` builders refuse raises one ModelLoadError."""
    try:
        return _gguf_tokenizer(f)
    except ModelLoadError:
        raise
    except Exception as e:          # tokenizers' own errors (merges out of the vocabulary, bad regexes)
        raise ModelLoadError(f"{f.path}: tokenizer.ggml.* does not build a tokenizer "
                             f"({type(e).__name__}: {e})") from None


def _gguf_tokenizer(f: GGUFFile) -> Tokenizer | None:
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
           "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", kind == "llama")),
           "unused_token_ids": [i for i, k in enumerate(types) if k == UNUSED]}   # decode to nothing
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
