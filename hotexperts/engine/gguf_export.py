"""Write a LoadedModel as a GGUF file the way llama.cpp's convert script lays it out (test models).

    write_gguf(lm, out_path, quant="q4_k", dense="f32", split_max_tensors=0, overrides=None) -> [paths]
    write_tokenizer(gguf_writer, tokenizer, vocab_size=0, bos_id=None)   tokenizer metadata only
        quant: experts' type, one of QUANTS (q4_k q4_0 q4_1 q8_0 q6_k q5_k q5_0 q5_1 mxfp4 bf16 f16 f32), or
               q4_k_m: Q4_K, with ffn_down_exps Q6_K in the layers llama.cpp's Q4_K_M gives more bits
               (q4_k_m_overrides)
        dense: non-expert tensors' type: f32 | f16 | bf16 | q8_0 (1-D tensors and norms stay f32)
        split_max_tensors > 0 writes name-0000i-of-0000N.gguf shards (gguf's own splitting)
        overrides: {GGUF tensor name: quant} per-tensor types, e.g. Q4_K_M-like Q6_K down in some layers
        out_path not ending in .gguf is a directory: <out_path>/model.gguf is written

Architecture-agnostic: the model's Architecture (models.get_arch) names the GGUF architecture, adds its own
`{arch}.*` keys (gguf_metadata) and shapes dense tensors as llama.cpp stores them (to_gguf: Mixtral's Q/K
rows permuted like llama.cpp's convert does, qwen2_moe's shared-expert gate flattened).
Metadata: general.*, `{arch}.*` hyper-parameters (llama.cpp key names), tokenizer.ggml.* from lm.tokenizer
(byte-level BPE: model "gpt2", pre "qwen2" for the Qwen split regex else "gpt-2"), tokenizer.chat_template.
Tensors: GGUF names (models/gguf_names.py), experts stacked [E, N, K] (ffn_{gate,up,down}_exps).
Quantization: gguf.quants for Q4_0/Q4_1/Q8_0/BF16/F16,
loading/gguf_quants.py's min/max packers for Q4_K/Q5_K/Q6_K. Rows that do not fill 256-weight blocks
fall back per tensor, as llama.cpp does (FALLBACK: Q4_K -> Q4_1, keeping the int4 path; Q5_K -> Q5_1;
Q6_K -> Q8_0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, TokenType

from hotexperts.engine.load import LoadedModel
from hotexperts.errors import HotExpertsError
from hotexperts.loading import gguf_quants as gq
from hotexperts.models import Architecture, get_arch
from hotexperts.models.gguf_names import gguf_name
from hotexperts.quant import dequantize as dequantize_weight
from hotexperts.tokenizer import QWEN_PAT

Q = GGMLQuantizationType
QUANTS = {"q4_k": Q.Q4_K, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0, "q6_k": Q.Q6_K, "q5_k": Q.Q5_K,
          "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "mxfp4": Q.MXFP4, "iq4_nl": Q.IQ4_NL, "iq4_xs": Q.IQ4_XS,
          "bf16": Q.BF16, "f16": Q.F16, "f32": Q.F32}
DENSE = ("f32", "f16", "bf16", "q8_0")
# rows not a multiple of 256 (llama.cpp: Q5_0..)
FALLBACK = {Q.Q4_K: Q.Q4_1, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.IQ4_XS: Q.IQ4_NL}


def q4_k_m_overrides(n_layers: int) -> dict[str, str]:
    """The expert down matrices llama.cpp's Q4_K_M stores as Q6_K (llama-quant's use_more_bits: the first
    and last eighth of the layers and every third one between); everything else of ours stays Q4_K."""
    e = n_layers // 8
    more = [i for i in range(n_layers) if i < e or i >= 7 * n_layers // 8 or (i - e) % 3 == 2]
    return {f"blk.{i}.ffn_down_exps.weight": "q6_k" for i in more}


def write_gguf(lm: LoadedModel, out_path: str | Path, quant: str = "q4_k", dense: str = "f32",
               split_max_tensors: int = 0, overrides: dict[str, str] | None = None) -> list[Path]:
    overrides = dict(overrides or {})
    if quant == "q4_k_m":
        quant, overrides = "q4_k", q4_k_m_overrides(lm.cfg.num_layers) | overrides
    for q in (quant, *overrides.values()):
        if q not in QUANTS:
            raise HotExpertsError(f"unknown GGUF quant {q!r}; choose one of {', '.join(QUANTS)}")
    if dense not in DENSE:
        raise HotExpertsError(f"unknown dense GGUF type {dense!r}; choose one of {', '.join(DENSE)}")
    cfg, out = lm.cfg, Path(out_path)
    if out.suffix != ".gguf":                                  # a directory: write <dir>/model.gguf
        out = out / "model.gguf"
    arch = get_arch(cfg.model_type)
    w = GGUFWriter(out, arch.gguf_arch, split_max_tensors=split_max_tensors)
    _write_config(w, lm, arch, QUANTS[quant])
    if lm.tokenizer is not None:
        write_tokenizer(w, lm.tokenizer, lm.cfg.vocab_size, lm.cfg.bos_token_id)
    _write_dense(w, lm, arch, QUANTS[dense])
    _write_experts(w, lm, QUANTS[quant], {k: QUANTS[v] for k, v in overrides.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    paths = w.format_shard_names(out)
    w.close()
    return paths


def _write_config(w: GGUFWriter, lm: LoadedModel, arch: Architecture, qtype: Q) -> None:
    c = lm.cfg
    w.add_name(f"hotexperts {c.model_type} ({qtype.name} experts)")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size or c.moe_intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.top_k)
    w.add_vocab_size(c.vocab_size)
    for key, value in arch.gguf_metadata(c).items():      # e.g. qwen: expert_feed_forward_length
        add = (w.add_array if isinstance(value, list) else w.add_bool if isinstance(value, bool)
               else w.add_uint32 if isinstance(value, int) else w.add_string if isinstance(value, str)
               else w.add_float32)
        add(f"{arch.gguf_arch}.{key}", value)
    w.add_file_type(int(qtype))


def _pre_name(pre: dict) -> str:
    """GGUF pre-tokenizer name of a byte-level BPE: "qwen2" for the Qwen split regex, else "gpt-2"."""
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p["type"] == "Split"]
    if splits == [QWEN_PAT]:
        return "qwen2"
    if splits:
        raise HotExpertsError("write_gguf: unknown split regex in the tokenizer's pre-tokenizer")
    return "gpt-2"


def _token_types(tok) -> list[int]:
    added = {i: t.special for i, t in tok.tok.get_added_tokens_decoder().items()}
    n = tok.tok.get_vocab_size(with_added_tokens=True)
    return [(TokenType.CONTROL if added[i] else TokenType.USER_DEFINED) if i in added else TokenType.NORMAL
            for i in range(n)]


def write_tokenizer(w: GGUFWriter, tok, vocab_size: int = 0, bos_id: int | None = None) -> None:
    """tokenizer.ggml.* of a byte-level BPE Tokenizer, padded with [PADi] (UNUSED) to vocab_size entries."""
    spec = json.loads(tok.tok.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise HotExpertsError("write_gguf exports byte-level BPE tokenizers only")
    inv = {i: t for t, i in tok.tok.get_vocab(with_added_tokens=True).items()}
    tokens = [inv.get(i, f"[PAD{i}]") for i in range(max(vocab_size, len(inv)))]
    types = _token_types(tok)
    types += [TokenType.UNUSED] * (len(tokens) - len(types))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(spec["pre_tokenizer"]))
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    eos = list(tok.eos_ids)
    pad = tok.config.get("pad_token")
    ids = {"bos": tok.bos_id if tok.bos_id is not None else bos_id, "eos": eos[0] if eos else None,
           "eot": eos[1] if len(eos) > 1 else None, "pad": tok.token_to_id(pad) if pad else None}
    for key, tid in ids.items():
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(int(tid))
    w.add_add_bos_token(bool(tok.config.get("add_bos_token")))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def row_type(qtype: Q, K: int) -> Q:
    """qtype, or its fallback when rows of K weights do not fill whole blocks (256-blocks -> 32-blocks)."""
    while K % gq.block_bytes(qtype)[0]:
        if qtype not in FALLBACK:
            raise HotExpertsError(f"rows of {K} weights cannot be stored as {qtype.name}")
        qtype = FALLBACK[qtype]
    return qtype


def _add(w: GGUFWriter, name: str, t: torch.Tensor, qtype: Q, chunk: int = 8) -> None:
    """Add float tensor t [..., K] in qtype (1-D tensors: F32), `chunk` leading entries at a time."""
    if qtype == Q.F32 or t.dim() < 2:
        w.add_tensor(name, np.ascontiguousarray(t.detach().float().cpu().numpy()))
        return
    qtype = row_type(qtype, t.shape[-1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"      # Q4_K/Q5_K/Q6_K packers run on the GPU if any
    parts = [gq.quantize(t[i:i + chunk].detach().to(dev, torch.float32), qtype)
             for i in range(0, len(t), chunk)]
    w.add_tensor(name, np.concatenate(parts), raw_dtype=None if qtype == Q.F16 else qtype)


def _write_dense(w: GGUFWriter, lm: LoadedModel, arch: Architecture, qtype: Q) -> None:
    for name, t in lm.model.state_dict().items():
        t = arch.to_gguf(lm.cfg, name, t)
        small = "norm" in name or "conv1d" in name                    # norms and conv taps stay F32
        _add(w, gguf_name(name, arch.moe_block, arch.gguf_names), t, Q.F32 if small else qtype)


def _write_experts(w: GGUFWriter, lm: LoadedModel, qtype: Q, overrides: dict[str, Q]) -> None:
    I = lm.cfg.moe_intermediate_size
    for l in lm.store.layers:
        le = lm.store.layer(l)
        w13 = dequantize_weight(le.w13)                                        # [E, 2I, D] fp32
        for which, t in (("gate", w13[:, :I]), ("up", w13[:, I:]), ("down", dequantize_weight(le.w2))):
            name = f"blk.{l}.ffn_{which}_exps.weight"
            _add(w, name, t, overrides.get(name, qtype))
        if le.b13 is not None:                                                 # GPT-OSS gate/up biases, F32
            _add(w, f"blk.{l}.ffn_gate_exps.bias", le.b13[:, :I], Q.F32)
            _add(w, f"blk.{l}.ffn_up_exps.bias", le.b13[:, I:], Q.F32)
