"""Bounded load test on a real uvicorn: 8 concurrent streaming clients (official AsyncOpenAI client),
200 malformed requests and 24 mid-stream disconnects, all at once. Ends with zero 5xx, the exact greedy
outputs, an empty queue, an idle worker, generation stopped for the disconnected clients, no leaked
threads."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
from live_server import MODEL, engine_fixture, serve  # noqa: F401  (the fixture "engine")

from hotexperts.engine.sampling import SamplingParams
from hotexperts.engine.textstream import TextStream

N_STREAMS, N_MALFORMED, N_DISCONNECTS = 8, 200, 24
STREAM_TOKENS, DISCONNECT_TOKENS = 8, 300
X = [{"role": "user", "content": "x"}]
MALFORMED = [b"{", b"", b"null", b"[]", b'{"model": "tiny"}'] + [json.dumps(b).encode() for b in (
    {"model": MODEL, "messages": []},
    {"model": 5, "messages": X},                      # any model name is served; a number is not one
    {"model": MODEL, "messages": X, "max_tokens": -1},
    {"model": MODEL, "messages": X, "max_tokens": 10**8},
    {"model": MODEL, "messages": [{"role": "user"}], "temperature": "hot"},
    {"model": MODEL, "messages": X, "n": 4},
    {"model": MODEL, "prompt": "word " * 700},
)]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {i}: tell me about topic number {i * 7}."}]


def references(engine) -> list[str]:
    out = []
    for i in range(N_STREAMS):
        ids = engine.tokenizer.encode_chat(messages(i))
        tokens = engine.generate(ids, SamplingParams(temperature=0, max_tokens=STREAM_TOKENS))
        out.append("".join(TextStream(engine.tokenizer).run(tokens)))
    return out


async def stream_client(client: openai.AsyncOpenAI, i: int) -> str:
    parts = []
    stream = await client.chat.completions.create(model=MODEL, messages=messages(i), max_tokens=STREAM_TOKENS,
                                                  temperature=0, stream=True)
    async for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
    return "".join(parts)


async def malformed(http: httpx.AsyncClient, sem: asyncio.Semaphore, i: int) -> int:
    body = MALFORMED[i % len(MALFORMED)]
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    async with sem:
        r = await http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    return r.status_code


async def disconnect(http: httpx.AsyncClient, i: int) -> bool:
    """Stream until the first text arrives, then drop the connection. True also when the generation ended
    (a finish_reason) before any text: a sampled end-of-text first token leaves nothing to drop (this
    made the test flaky when the sampling was unseeded)."""
    body = {"model": MODEL, "messages": messages(100 + i), "max_tokens": DISCONNECT_TOKENS,
            "temperature": 0.8, "seed": 1000 + i, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["delta"].get("content") or choice.get("finish_reason"):
                return True
    return False


async def load(url: str):
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http, \
            httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as drops, \
            openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        sem = asyncio.Semaphore(16)
        streams = asyncio.gather(*(stream_client(client, i) for i in range(N_STREAMS)))
        bad = asyncio.gather(*(malformed(http, sem, i) for i in range(N_MALFORMED)))
        dropped = asyncio.gather(*(disconnect(drops, i) for i in range(N_DISCONNECTS)))
        return await asyncio.gather(streams, bad, dropped)


def metric_values(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_bounded_load(engine):
    want = references(engine)
    threads_before = set(threading.enumerate())
    t0 = time.monotonic()
    with serve(engine, max_queue=64) as s:
        texts, statuses, dropped = asyncio.run(asyncio.wait_for(load(s.url), 80))
        assert s.wait_idle(10), "the worker did not go idle"
        assert s.state.worker.depth == 0 and not s.state.worker.busy and s.state.worker.alive
        metrics = metric_values(httpx.get(s.url + "/metrics").text)
    assert time.monotonic() - t0 < 85
    assert texts == want
    assert all(400 <= st < 500 for st in statuses) and len(statuses) == N_MALFORMED
    assert all(dropped)
    assert not [k for k in metrics if k.startswith("hotexperts_http_requests_total") and 'status="5' in k]
    ok = metrics['hotexperts_http_requests_total{route="/v1/chat/completions",status="200"}']
    assert ok == N_STREAMS + N_DISCONNECTS
    # the disconnected clients stopped their generation: far fewer tokens than they asked for
    assert metrics["hotexperts_generation_tokens_total"] < N_STREAMS * STREAM_TOKENS + N_DISCONNECTS * 40
    end = time.monotonic() + 10
    while set(threading.enumerate()) - threads_before and time.monotonic() < end:
        time.sleep(0.05)
    leaked = [t.name for t in set(threading.enumerate()) - threads_before]
    assert not leaked, f"leaked threads: {leaked}"
