"""Tokenizers built from GGUF metadata agree with the original tokenizer and with transformers' own GGUF
tokenizer conversion: byte-level BPE (GPT-2 and Qwen split regexes) and SentencePiece-style vocabularies."""

import os
import warnings

import pytest
from gguf import GGUFWriter, TokenType
from tokenizers import Regex, pre_tokenizers
from tokenizers.implementations import SentencePieceBPETokenizer

from hotexperts import tokenizer as tk
from hotexperts.engine import presets
from hotexperts.engine.gguf_export import write_tokenizer
from hotexperts.engine.load_gguf import gguf_tokenizer, spm_merges
from hotexperts.loading.gguf_reader import GGUFFile

TEXTS = ["Hello world, café 日本 1234567", "  leading spaces\n\nnew lines\ttabs  ", "don't I'LL 12,345.67 ok",
         "<|im_start|>user\nhi there<|im_end|>\n", "emoji 🤖🚀 and ÄÖÜ straße", "The quick brown fox."]


def write_meta(path, fill, arch="qwen3moe"):
    w = GGUFWriter(path, arch)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_gguf_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def check(ours, hf, original=None, texts=TEXTS):
    for s in texts:
        ids = ours.encode(s, add_special_tokens=False)
        assert ids == hf(s, add_special_tokens=False).input_ids, s
        if original is not None:
            assert ids == original.encode(s, add_special_tokens=False), s
        assert ours.decode(ids) == hf.decode(ids), s


@pytest.mark.parametrize("split", ["gpt-2", "qwen2"])
def test_byte_level_bpe(tmp_path, split):
    tok = presets.build_tokenizer(presets.PRESETS["tiny-qwen3-moe"].tok)
    if split == "qwen2":                                     # the Qwen split regex on the tiny vocabulary
        tok.tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tk.QWEN_PAT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    path = write_meta(tmp_path / "t.gguf", lambda w: write_tokenizer(w, tok, 1100))
    f = GGUFFile(path)
    assert f.get("tokenizer.ggml.pre") == split and f.get("tokenizer.ggml.model") == "gpt2"
    ours = gguf_tokenizer(f)
    check(ours, hf_gguf_tokenizer(path), tok)
    assert ours.eos_ids == tok.eos_ids and ours.chat_template == tok.chat_template
    assert ours.vocab_size == 1100                            # padded with [PADi] like llama.cpp's convert
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.encode_chat(msgs) == tok.encode_chat(msgs)


def spm_fill(w):
    """SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, BPE pieces scored by merge rank."""
    spm = SentencePieceBPETokenizer()
    corpus = (tk.ASSETS / "corpus.txt").read_text(encoding="utf-8").splitlines()
    spm.train_from_iterator(corpus, vocab_size=600, show_progress=False, special_tokens=[])
    pieces = [t for t, _ in sorted(spm.get_vocab().items(), key=lambda kv: kv[1])]
    byte_toks = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *byte_toks, *[p for p in pieces if p not in byte_toks]]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (len(tokens) - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(tk.chat_template("mistral"))


def test_sentencepiece_vocabulary(tmp_path):
    path = write_meta(tmp_path / "s.gguf", spm_fill, arch="llama")
    ours = gguf_tokenizer(GGUFFile(path))
    hf = hf_gguf_tokenizer(path)
    check(ours, hf, texts=[*TEXTS, "tabs\tand ☃ snowman"])          # ☃ is not in the vocabulary: bytes
    assert ours.encode("Hello") == hf("Hello").input_ids and ours.encode("Hello")[0] == 1   # adds BOS
    assert ours.bos_id == 1 and ours.eos_ids == (2,)
    assert "<0xE2>" in [ours.tok.id_to_token(i) for i in ours.encode("☃")]          # byte fallback


def test_spm_merges_order():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    assert spm_merges(tokens, [0, 0, 0, -1, -2, -3]) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


@pytest.mark.skipif(not os.environ.get("HOTEXPERTS_SLOW"), reason="slow (~1 min): set HOTEXPERTS_SLOW=1")
def test_real_qwen_vocabulary(tmp_path):
    tok = presets.build_tokenizer(presets.PRESETS["qwen3-30b-a3b"].tok)
    path = write_meta(tmp_path / "q.gguf", lambda w: write_tokenizer(w, tok, 151936, 151643))
    ours = gguf_tokenizer(GGUFFile(path))
    check(ours, hf_gguf_tokenizer(path), tok, texts=[*TEXTS, "<think>\nx\n</think>"])
    assert ours.eos_ids == (151645, 151643)
