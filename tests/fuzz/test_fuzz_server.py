"""Fuzz: >= 200 hostile HTTP requests (deterministic) against a live server on the tiny engine. Pass: every
answer is 2xx, or a 4xx with an OpenAI-shaped JSON error carrying a code; never a 500, a dropped connection
or a stall (each answer within 20 s); the server still answers normally afterwards."""

from __future__ import annotations

import collections
import json
import random
import socket
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))
from live_server import MODEL, engine_fixture, serve  # noqa: E402, F401  (the fixture "engine")

MSG = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}


def _body(**kw) -> dict:
    return {"model": MODEL, "messages": MSG, "max_tokens": 2, **kw}


def _values():
    return [None, True, -1, 0, 1e-300, -0.0, 1e308, 2**64, -2**70, "1", "", "x" * 10_000, [], {}, [1] * 1000,
            {"a": [{}]}, 1.5, float("nan")]


def requests(rng: random.Random):
    """(label, method, path, headers, body bytes) for every hostile request."""
    fields = ["model", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
              "stop_token_ids", "stream", "n", "logit_bias", "chat_template_kwargs", "max_completion_tokens",
              "stream_options", "response_format", "tools"]
    for f in fields:
        for v in _values():
            body = json.dumps(_body(**{f: v}), allow_nan=True).encode()
            yield f"chat {f}={str(v)[:20]}", "POST", "/v1/chat/completions", JSON, body
    for v in (1e-300, 1e-45, 1e-6, 2.0):
        body = json.dumps(_body(temperature=v)).encode()
        yield f"temperature {v}", "POST", "/v1/chat/completions", JSON, body
        yield f"top_p {v}", "POST", "/v1/chat/completions", JSON, json.dumps(_body(top_p=min(v, 1.0),
                                                                                   temperature=1)).encode()
    for depth in (50, 65, 1000, 100_000):
        nested = "[" * depth + "]" * depth
        yield f"nested {depth}", "POST", "/v1/chat/completions", JSON, \
            f'{{"model": "{MODEL}", "messages": {nested}}}'.encode()
    for prompt in ([-1], [10**9], [True], [[1, 2], [3]], [[]], "x" * 200_000, ["a", 1], {"a": 1}):
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 2}).encode()
        yield f"prompt {str(prompt)[:20]}", "POST", "/v1/completions", JSON, body
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        yield f"content-type {ctype!r}", "POST", "/v1/chat/completions", {"Content-Type": ctype}, \
            json.dumps(_body()).encode()
    for host in ("evil.example", "127.0.0.1.evil.example", "localhost.", "[::2]"):
        body = json.dumps(_body()).encode()
        yield f"host {host}", "POST", "/v1/chat/completions", {**JSON, "Host": host}, body
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
        yield f"origin {origin}", "POST", "/v1/chat/completions", {**JSON, "Origin": origin}, \
            json.dumps(_body()).encode()
    many = {f"X-H{i}": "v" for i in range(100)}
    yield "100 headers", "GET", "/v1/models", many, b""
    yield "32 KiB header", "GET", "/v1/models", {"X-Big": "v" * 32_768}, b""
    for raw in (b"\xff\xfe{", b"\xef\xbb\xbf{}", b"null", b"[]", b"1e999999",
                b'{"model": "tiny", "messages": NaN}', b'{"model": "tiny", "model": 1, "messages": []}',
                b"{" * 10_000):
        yield f"raw {raw[:16]!r}", "POST", "/v1/chat/completions", JSON, raw
    for _ in range(20):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        yield "random bytes", "POST", "/v1/chat/completions", JSON, body
    for method, path in (("PUT", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("GET", "/../etc/passwd"),
                         ("POST", "/v1/models"), ("GET", "/v1/models/" + "x" * 5000)):
        yield f"{method} {path[:30]}", method, path, JSON, b"{}"


def classify(status: int | None, body: bytes) -> str:
    if status is None:
        return "dropped or stalled"
    if status >= 500:
        return "5xx"
    if status < 300:
        return "2xx"
    try:
        err = json.loads(body)["error"]
        return "4xx JSON" if err.get("code") or err.get("type") else "4xx without code"
    except (ValueError, KeyError, TypeError):
        return "4xx not JSON"


def test_fuzz_server(engine):
    table, findings = collections.Counter(), []
    t0 = time.monotonic()
    with serve(engine, max_queue=4) as s, httpx.Client(base_url=s.url, timeout=20) as c:
        for label, method, path, headers, body in requests(random.Random(18)):
            try:
                r = c.request(method, path, headers=headers, content=body)
                status, content = r.status_code, r.content
            except httpx.HTTPError:
                status, content = None, b""
            result = classify(status, content)
            table[result] += 1
            if result not in ("2xx", "4xx JSON"):
                findings.append((label, status, content[:200]))
        big = c.get("/v1/models", headers={"X-Big": "v" * 32_768})
        assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large"
        ok = c.post("/v1/chat/completions", json=_body(temperature=0))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    print(dict(table), f"{time.monotonic() - t0:.1f} s")
    assert sum(table.values()) >= 200
    assert not findings, findings[:10]


def test_tiny_sampling_values_are_greedy(engine):
    with serve(engine) as s:
        greedy = httpx.post(s.url + "/v1/chat/completions", json=_body(temperature=0, max_tokens=4)).json()
        tiny = httpx.post(s.url + "/v1/chat/completions", json=_body(temperature=1e-300, max_tokens=4)).json()
        top = httpx.post(s.url + "/v1/chat/completions", json=_body(top_p=1e-300, max_tokens=4)).json()
    text = greedy["choices"][0]["message"]["content"]
    assert tiny["choices"][0]["message"]["content"] == text == top["choices"][0]["message"]["content"]


def test_idle_and_slow_connections_are_closed(engine):
    with serve(engine, keep_alive_s=0.5) as s:
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(5)
        t0, data = time.monotonic(), b""
        while chunk := sock.recv(4096):                      # the answer, then EOF: closed once idle
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < 3
        sock.close()
