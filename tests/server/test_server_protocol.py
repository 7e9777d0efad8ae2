"""Request parsing and sampling parameters (no server): strict types, rejected parameters, context checks,
and the folded stream equals the concatenated chunks."""

from __future__ import annotations

import asyncio
import json

import pytest

from hotexperts.server import protocol
from hotexperts.server.errors import APIError
from hotexperts.server.queue import Event
from hotexperts.server.stream import Meta, fold, make_chunks, sse_lines

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw) -> bytes:
    return json.dumps({"model": "m", "messages": MSG} | kw).encode()


def error_of(kind, raw) -> APIError:
    with pytest.raises(APIError) as e:
        req = protocol.parse_request(kind, raw)
        if kind == "chat":
            protocol.chat_messages(req)
        else:
            protocol.completion_prompt(req)
    return e.value


@pytest.mark.parametrize("raw, param, code", [
    (b"{", None, "invalid_json"),
    (b"\xff\xfe", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (b'{"model": "m"}', "messages", "missing_parameter"),
    (chat(messages=[]), "messages", "empty_messages"),
    (chat(messages="hi"), "messages", "invalid_type"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role", "invalid_type"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages.0.content", "invalid_type"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages.0.content", "unsupported_parameter"),
    (chat(temperature="0.5"), "temperature", "invalid_type"),
    (chat(max_tokens=1.5), "max_tokens", "invalid_type"),
    (chat(max_tokens=True), "max_tokens", "invalid_type"),
    (chat(stream="yes"), "stream", "invalid_type"),
    (chat(stop=[1, 2]), "stop", "invalid_type"),
    (chat(n=2), "n", "unsupported_parameter"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "unsupported_parameter"),
    (chat(tool_choice="required"), "tool_choice", "unsupported_parameter"),
    (chat(top_logprobs=2), "top_logprobs", "invalid_value"),
    (chat(logit_bias={"1": 5}), "logit_bias", "unsupported_parameter"),
    (chat(response_format={"type": "json_object"}), "response_format", "unsupported_parameter"),
])
def test_chat_rejects(raw, param, code):
    e = error_of("chat", raw)
    assert e.status == 400 and e.param == param and e.code == code
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param, code", [
    ({"prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
    ({"prompt": ""}, "prompt", "empty_prompt"),
    ({"prompt": []}, "prompt", "empty_prompt"),
    ({"prompt": "x", "echo": True}, "echo", "unsupported_parameter"),
    ({"prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter"),
    ({"prompt": {"text": "x"}}, "prompt", "invalid_type"),
])
def test_completion_rejects(body, param, code):
    e = error_of("completion", json.dumps({"model": "m"} | body).encode())
    assert e.status == 400 and e.param == param and e.code == code


def test_accepted_and_ignored():
    req = protocol.parse_request("chat", chat(user="u", metadata={"a": 1}, parallel_tool_calls=False,
                                              tool_choice="none", response_format={"type": "text"},
                                              n=1, temperature=1, unknown_field=3))
    msgs = protocol.chat_messages(req)
    assert msgs == [{"role": "user", "content": "hi"}]
    req = protocol.parse_request("chat", chat(messages=[{"role": "developer", "content": "be brief"}] + MSG))
    assert protocol.chat_messages(req)[0] == {"role": "system", "content": "be brief"}
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = protocol.parse_request("chat", chat(messages=[{"role": "user", "content": parts},
                                                        {"role": "assistant", "content": None}]))
    assert [m["content"] for m in protocol.chat_messages(req)] == ["ab", ""]
    assert protocol.completion_prompt(protocol.parse_request(
        "completion", b'{"model": "m", "prompt": [[1, 2, 3]]}')) == [1, 2, 3]


def test_sampling_params_and_context():
    req = protocol.parse_request("chat", chat(temperature=0, top_k=5, seed=3, stop="###",
                                              max_completion_tokens=7, max_tokens=99))
    p = protocol.sampling_params(req, n_prompt=10, max_context=100)
    assert (p.temperature, p.top_k, p.seed, p.stop, p.max_tokens) == (0, 5, 3, ("###",), 7)
    req = protocol.parse_request("chat", chat())
    p = protocol.sampling_params(req, 10, 100, defaults={"temperature": 0.6, "top_p": 0.95})
    assert (p.temperature, p.top_p, p.max_tokens) == (0.6, 0.95, 90)      # unset max_tokens = the room left
    for kw, param, code in [({"max_tokens": 0}, "max_tokens", "invalid_value"),
                            ({"max_tokens": -5}, "max_tokens", "invalid_value"),
                            ({"max_tokens": 91}, "max_tokens", "context_length_exceeded"),
                            ({"max_tokens": 10**12}, "max_tokens", "context_length_exceeded"),
                            ({"temperature": 3.0}, "temperature", "invalid_value"),
                            ({"top_p": 0.0}, "top_p", "invalid_value"),
                            ({"top_k": -1}, "top_k", "invalid_value"),
                            ({"seed": 2**64}, "seed", "invalid_value"),
                            ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
                            ({"repetition_penalty": 0.0}, "repetition_penalty", "invalid_value"),
                            ({"logprobs": True, "top_logprobs": 21}, "logprobs", "invalid_value")]:
        with pytest.raises(APIError) as e:
            protocol.sampling_params(protocol.parse_request("chat", chat(**kw)), 10, 100)
        assert (e.value.status, e.value.param, e.value.code) == (400, param, code), kw
    with pytest.raises(APIError) as e:                                      # the prompt alone fills it
        protocol.sampling_params(protocol.parse_request("chat", chat()), 100, 100)
    assert (e.value.param, e.value.code) == ("messages", "context_length_exceeded")


async def _events(evs):
    for ev in evs:
        yield ev


def test_fold_is_the_stream():
    evs = [Event("delta", text="Hel"), Event("delta", text="lo"),
           Event("end", finish_reason="stop", prompt_tokens=4, completion_tokens=2)]
    meta = Meta("id-1", 123, "m")

    async def main():
        folded = await fold("chat", make_chunks("chat", _events(evs), meta))
        lines = [x async for x in sse_lines(make_chunks("chat", _events(evs), meta), include_usage=True)]
        text_folded = await fold("completion", make_chunks("completion", _events(evs), meta))
        return folded, lines, text_folded

    folded, lines, text_folded = asyncio.run(main())
    assert folded["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert folded["choices"][0]["finish_reason"] == "stop" and folded["object"] == "chat.completion"
    assert folded["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert text_folded["choices"][0]["text"] == "Hello" and text_folded["usage"] == folded["usage"]
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello"
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["total_tokens"] == 6


def test_penalties_logprobs_and_any_model():
    req = protocol.parse_request("chat", json.dumps({"messages": MSG, "presence_penalty": 0.5,
                                                     "frequency_penalty": -0.5, "repetition_penalty": 1.1,
                                                     "logprobs": True, "top_logprobs": 3}).encode())
    p = protocol.sampling_params(req, 10, 100)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logprobs) == (0.5, -0.5, 1.1, 3)
    assert protocol.sampling_params(protocol.parse_request("chat", chat(logprobs=True)), 1, 9).logprobs == 0
    assert protocol.sampling_params(protocol.parse_request("chat", chat()), 1, 9).logprobs is None
    req = protocol.parse_request("completion", b'{"prompt": "x", "logprobs": 2, "model": "anything"}')
    assert protocol.sampling_params(req, 1, 9).logprobs == 2
    req = protocol.parse_request("chat", chat())
    p = protocol.sampling_params(req, 1, 9, defaults={"repetition_penalty": 1.05})
    assert p.repetition_penalty == 1.05


def test_logprobs_shapes_fold_like_stream():
    entry = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [{"token": "a", "logprob": -0.5,
                                                                             "bytes": [97]}]}
    meta = Meta("x", 0, "m")

    async def events():
        yield Event("delta", text="a", logprobs=[entry])
        yield Event("delta", text="a", logprobs=[entry])
        yield Event("end", finish_reason="length", prompt_tokens=1, completion_tokens=2)

    chat_full = asyncio.run(fold("chat", make_chunks("chat", events(), meta)))
    assert chat_full["choices"][0]["logprobs"] == {"content": [entry, entry]}
    text_full = asyncio.run(fold("completion", make_chunks("completion", events(), meta)))
    assert text_full["choices"][0]["logprobs"] == {"tokens": ["a", "a"], "token_logprobs": [-0.5, -0.5],
                                                   "top_logprobs": [{"a": -0.5}, {"a": -0.5}],
                                                   "text_offset": [0, 1]}
