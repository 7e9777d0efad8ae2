"""OpenAI response chunks from engine events; SSE for streaming, the folded stream for non-streaming.

    chunks = make_chunks(kind, events, meta)    # async iterator of chunk dicts; the last one carries usage
    sse_lines(chunks, include_usage)             # 'data: {...}\\n\\n' ... 'data: [DONE]\\n\\n'
    await fold(kind, chunks)                     # the non-streaming response object (same chunks, folded)

Events come from queue.Job: Event(kind="delta", text=..., logprobs=[{token, logprob, bytes, top_logprobs}]
or None), Event(kind="end", finish_reason, prompt_tokens,
completion_tokens), Event(kind="error", error=APIError). An error after the stream started becomes one
`data: {"error": {...}}` line followed by `data: [DONE]`; in a non-streaming request it is raised.
logprobs, when asked, are in OpenAI's shapes: chat `choices[0].logprobs = {"content": [entry...]}`,
completions `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`, on every
delta chunk (streaming) or concatenated (non-streaming); null otherwise.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hotexperts.server.errors import APIError


@dataclass(frozen=True)
class Meta:
    id: str
    created: int
    model: str


def _chat_chunk(meta: Meta, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def _text_chunk(meta: Meta, text: str, finish: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """Chat-shaped entries -> the legacy completions shape; text_offset counts from `offset`."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def make_chunks(kind: str, events: AsyncIterator, meta: Meta) -> AsyncIterator[dict]:
    """Chunks in OpenAI's order: (chat: role chunk), deltas, the finish chunk, then a usage chunk."""
    if kind == "chat":
        yield _chat_chunk(meta, {"role": "assistant", "content": ""})
    offset = 0
    async for ev in events:
        if ev.kind == "delta" and kind == "chat":
            yield _chat_chunk(meta, {"content": ev.text},
                              logprobs=None if ev.logprobs is None else {"content": ev.logprobs})
        elif ev.kind == "delta":
            lps = None if ev.logprobs is None else completion_logprobs(ev.logprobs, offset)
            offset += sum(len(e["token"]) for e in ev.logprobs or ())
            yield _text_chunk(meta, ev.text, logprobs=lps)
        elif ev.kind == "error":
            raise ev.error
        elif ev.kind == "end":
            yield _chat_chunk(meta, {}, ev.finish_reason) if kind == "chat" else \
                _text_chunk(meta, "", ev.finish_reason)
            final = _chat_chunk(meta, {}) if kind == "chat" else _text_chunk(meta, "")
            yield final | {"choices": [], "usage": _usage(ev.prompt_tokens, ev.completion_tokens)}
            return


def is_usage_chunk(chunk: dict) -> bool:
    return not chunk["choices"] and "usage" in chunk


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_lines(chunks: AsyncIterator[dict], include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; with include_usage every chunk has "usage" (null but on the last one)."""
    try:
        async for chunk in chunks:
            if is_usage_chunk(chunk):
                if include_usage:
                    yield _data(chunk)
                continue
            yield _data(chunk | {"usage": None} if include_usage else chunk)
    except APIError as e:
        yield _data(e.body())
    yield "data: [DONE]\n\n"


async def fold(kind: str, chunks: AsyncIterator[dict]) -> dict:
    """The non-streaming response: the same chunks, concatenated."""
    parts, finish, usage, head, lps = [], None, None, None, None
    async for chunk in chunks:
        head = head or chunk
        if is_usage_chunk(chunk):
            usage = chunk["usage"]
            continue
        choice = chunk["choices"][0]
        parts.append(choice["delta"].get("content", "") if kind == "chat" else choice["text"])
        finish = choice["finish_reason"] or finish
        if choice["logprobs"] is not None:
            lps = _merge(lps, choice["logprobs"])
    base = {"id": head["id"], "created": head["created"], "model": head["model"]}
    text = "".join(parts)
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                  "finish_reason": finish}
        return base | {"object": "chat.completion", "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": finish}
    return base | {"object": "text_completion", "choices": [choice], "usage": usage}


def _merge(into: dict | None, more: dict) -> dict:
    """Concatenate two logprobs objects of the same shape (their lists, key by key)."""
    if into is None:
        return {k: list(v) for k, v in more.items()}
    for k, v in more.items():
        into[k].extend(v)
    return into
