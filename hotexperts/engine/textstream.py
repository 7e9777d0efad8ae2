"""Streaming text with stop strings, over the engine's token ids and the tokenizer's StreamDecoder.

    stream = TextStream(tokenizer, stop=("\\n\\n", "User:"))
    for delta in stream.run(engine.generate(prompt_ids, params)):   # Iterator[str]
        print(delta, end="")
    stream.finish_reason        # "stop" when a stop string ended the text, else None (ask the engine)

- text is decoded incrementally (the tokenizer's StreamDecoder holds back incomplete UTF-8 / merges);
- text that could still become a stop string (a suffix of the output that is a prefix of a stop string)
  is held back until it is resolved;
- the output ends exactly before the earliest stop string; the token iterator is then closed, so the
  engine stops generating at once. The stop string itself is not emitted.
`StopMatcher` is the pure-text part and can be used on any string deltas.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence


class StopMatcher:
    """Feeds text deltas; emits what is safe, holds back possible stop-string prefixes."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(s for s in stop if s)
        self.held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Returns the text safe to emit now; sets `stopped` when a stop string was found."""
        if self.stopped or not delta:
            return ""
        buf = self.held + delta
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return buf[:cut]
        keep = self._partial_len(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """End of text: whatever was held back is not a stop string after all."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best


def new_stream_decoder(tokenizer):
    """The tokenizer's incremental detokenizer (`Tokenizer.stream()`): `step(token_id) -> str` delta."""
    return tokenizer.stream()


def _flush(decoder) -> str:
    flush = getattr(decoder, "flush", None)
    return flush() if callable(flush) else ""


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.finish_reason: str | None = None
        self.text = ""                 # everything emitted so far
        self.tokens = 0                # token ids consumed

    def run(self, token_ids: Iterable[int]) -> Iterator[str]:
        decoder, matcher = new_stream_decoder(self.tokenizer), StopMatcher(self.stop)
        it = iter(token_ids)
        try:
            for tok in it:
                self.tokens += 1
                out = matcher.feed(decoder.step(tok))
                yield from self._emit(out)
                if matcher.stopped:
                    self.finish_reason = "stop"
                    return
            out = matcher.feed(_flush(decoder))
            yield from self._emit(out if matcher.stopped else out + matcher.flush())
            self.finish_reason = "stop" if matcher.stopped else None
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _emit(self, text: str) -> Iterator[str]:
        if text:
            self.text += text
            yield text


def stream_text(tokenizer, token_ids: Iterable[int], stop: Sequence[str] = ()) -> Iterator[str]:
    """Shorthand for TextStream(tokenizer, stop).run(token_ids)."""
    return TextStream(tokenizer, stop).run(token_ids)
