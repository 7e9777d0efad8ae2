"""Stop strings over streamed text: hold-back of prefixes, exact cut, stop strings split across tokens."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from hotexperts.engine.textstream import StopMatcher, TextStream, stream_text
from hotexperts.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    """A byte-level tokenizer with one token per byte (so any text splits into many small tokens)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    hf = HFTokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer(hf)


def feed_all(matcher, deltas):
    return [matcher.feed(d) for d in deltas]


def test_matcher_without_stops_passes_through():
    m = StopMatcher()
    assert feed_all(m, ["ab", "c"]) == ["ab", "c"] and m.flush() == ""


def test_matcher_holds_back_prefix_then_releases():
    m = StopMatcher(["STOP"])
    assert feed_all(m, ["hello S", "T", "x"]) == ["hello ", "", "STx"]
    assert not m.stopped


def test_matcher_cuts_exactly_before_stop_split_across_deltas():
    m = StopMatcher(["STOP"])
    assert feed_all(m, ["ab S", "TO", "P and more"]) == ["ab ", "", ""]
    assert m.stopped and m.flush() == "" and m.feed("later") == ""


def test_matcher_earliest_of_several_stops_and_flush_releases_held():
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == "hel" and m.stopped
    m = StopMatcher(["\n\n"])
    assert m.feed("line\n") == "line" and m.flush() == "\n"


def test_textstream_stops_on_string_split_across_tokens_and_closes_source(tok):
    text = "The answer is 42.\nUser: more text"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())
    closed = []

    def source():
        try:
            yield from ids
        finally:
            closed.append(True)

    ts = TextStream(tok, stop=["\nUser:"])
    out = list(ts.run(source()))
    assert "".join(out) == "The answer is 42." and ts.text == "The answer is 42."
    assert ts.finish_reason == "stop" and closed == [True]
    assert ts.tokens < len(ids)                              # stopped consuming right after the stop string


def test_textstream_multibyte_and_no_stop(tok):
    text = "héllo wörld ✓"
    out = list(stream_text(tok, tok.encode(text)))
    assert "".join(out) == text and all(out)
    assert "".join(stream_text(tok, tok.encode(text), stop=["✗"])) == text


def test_textstream_stop_at_start_gives_nothing(tok):
    ts = TextStream(tok, stop=["Hi"])
    assert list(ts.run(tok.encode("Hi there"))) == [] and ts.finish_reason == "stop"
