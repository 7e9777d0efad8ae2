"""The HTTP API on a real uvicorn (127.0.0.1, random port) driven by the official `openai` client and httpx:
chat and completions, streaming and not, usage, stop strings, errors, API key, 429, time limit, metrics."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from live_server import MODEL, engine_fixture, serve  # noqa: F401  (the fixture "engine")

from hotexperts.engine.sampling import SamplingParams
from hotexperts.engine.textstream import TextStream

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]


def reference(engine, ids, max_tokens, stop=()) -> str:
    """Greedy text straight from the engine (call only while the server is idle)."""
    stream = TextStream(engine.tokenizer, stop)
    return "".join(stream.run(engine.generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens))))


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine, max_queue=16) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_chat_stream_equals_nonstream(server, client, engine):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = engine.tokenizer.encode_chat(MESSAGES)
    assert server.wait_idle()
    want = reference(engine, ids, 8)
    assert full.choices[0].message.content == streamed == want
    assert full.choices[0].message.role == "assistant" and chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason] == ["length"]
    assert full.usage.prompt_tokens == len(ids) and full.usage.completion_tokens == 8
    assert chunks[-1].usage == full.usage and not chunks[-1].choices
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and full.id.startswith("chatcmpl-") and full.model == MODEL


def test_completions_stream_equals_nonstream(server, client, engine):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    assert server.wait_idle()
    ids = engine.tokenizer.encode("The quick brown fox")
    assert full.choices[0].text == "".join(c.choices[0].text for c in chunks) == reference(engine, ids, 6)
    assert full.usage.prompt_tokens == len(ids) and full.usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks)               # no include_usage: no usage chunk
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == full.choices[0].text


def test_stop_string(server, client, engine):
    ids = engine.tokenizer.encode_chat(MESSAGES)
    text = reference(engine, ids, 12)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip() and text.find(stop) > 0
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                         stop=[stop, "never-seen-stop"])
    assert out.choices[0].message.content == text[:text.find(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0.9, top_p=0.9, seed=1234)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    c = client.chat.completions.create(**kw, extra_body={"top_k": 3, "min_p": 0.05}).choices[0].message
    assert a == b and isinstance(c.content, str)


def test_any_model_name_penalties_and_logprobs(server, client, engine):
    """Clients that send their own model name, penalties and logprobs are served, in OpenAI's shapes."""
    kw = dict(messages=MESSAGES, max_tokens=5, temperature=0)
    other = client.chat.completions.create(model="gpt-4o-mini", **kw)
    ours = client.chat.completions.create(model=MODEL, **kw)
    assert other.model == MODEL and other.choices[0].message.content == ours.choices[0].message.content
    pen = client.chat.completions.create(model="x", presence_penalty=1.5, frequency_penalty=1.0, **kw)
    assert isinstance(pen.choices[0].message.content, str)
    lp = client.chat.completions.create(model="x", logprobs=True, top_logprobs=2, **kw)
    content = lp.choices[0].logprobs.content
    assert lp.choices[0].message.content == ours.choices[0].message.content
    assert len(content) == lp.usage.completion_tokens == 5
    assert "".join(c.token for c in content) == lp.choices[0].message.content
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)    # greedy: the best one
    chunks = list(client.chat.completions.create(model="x", logprobs=True, top_logprobs=2, stream=True, **kw))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [c.token for c in content]
    comp = client.completions.create(model="y", prompt="The quick brown fox", max_tokens=4, temperature=0,
                                     logprobs=1)
    lps = comp.choices[0].logprobs
    assert "".join(lps.tokens) == comp.choices[0].text and len(lps.token_logprobs) == 4
    assert lps.text_offset[0] == 0 and all(len(d) == 1 for d in lps.top_logprobs)
    assert server.wait_idle()


def test_models_health_and_not_found(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    h = httpx.get(server.url + "/health").json()
    assert h == {"status": "ok", "model": MODEL, "queue_depth": 0, "running": False, "slots": 1}
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


LONG = "word " * 600
BAD = [
    (b"{not json", 400, None),
    (b'"a string"', 400, None),
    (json.dumps({"model": MODEL}), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": []}), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": -3}), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 10**9}), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": "8"}), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": LONG}]}), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "n": 3}), 400, "n"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "tools": [{"type": "function"}]}), 400, "tools"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": -1}), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "stop": ""}), 400, "stop"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "seed": 2**65}), 400, "seed"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_requests(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_cors_only_when_allowed(server, engine):
    pre = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(server.url + "/v1/chat/completions",
                                                              headers=pre).headers
    with serve(engine, allowed_origins=("http://ui.example",)) as s:
        r = httpx.options(s.url + "/v1/chat/completions", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"


def test_body_too_large(engine):
    with serve(engine, max_body_bytes=1000) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x" * 2000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_bad_completion_and_context_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=LONG, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[10**7], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, echo=True)
    ok = client.completions.create(model=MODEL, prompt="still serving", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_api_key(engine):
    with serve(engine, api_key="sekret") as s:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "temperature": 0}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.post(s.url + "/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        with openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0) as good:
            assert good.chat.completions.create(**body).usage.completion_tokens == 2


async def _first_content(lines) -> None:
    """Read SSE lines up to the first text. Keep a reference to `lines` while the stream should stay open:
    a dropped line iterator is finalized by the garbage collector, which closes the connection."""
    async for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return


def test_queue_full_429_then_recovers(engine):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True}

    async def main(s):
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            async with c.stream("POST", "/v1/chat/completions", json=body) as running:
                lines = running.aiter_lines()
                await _first_content(lines)                   # A generates
                waiting = asyncio.create_task(c.post("/v1/chat/completions", json=body | {"stream": False}))
                while s.state.worker.depth < 1:               # B waits in the queue
                    await asyncio.sleep(0.01)
                r = await c.post("/v1/chat/completions", json=body)
                assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
                assert int(r.headers["Retry-After"]) >= 1
                assert s.state.worker.busy
                waiting.cancel()                               # B's client leaves while queued
                await asyncio.gather(waiting, return_exceptions=True)
                end = time.monotonic() + 5
                while s.state.worker.depth and time.monotonic() < end:
                    await asyncio.sleep(0.02)
                assert s.state.worker.depth == 0 and s.state.worker.busy   # B's place freed, A still runs
                del lines
            # A's client left mid-stream: both places are freed long before 400 tokens
            assert await asyncio.to_thread(s.wait_idle, 10)
            ok = await c.post("/v1/chat/completions", json=body | {"stream": False, "max_tokens": 2})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2

    with serve(engine, max_queue=1) as s:
        asyncio.run(main(s))


def test_time_limit_ends_with_length(engine):
    with serve(engine, request_timeout=0.4) as s:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
            t0 = time.monotonic()
            out = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=450, temperature=0)
            assert time.monotonic() - t0 < 10
            assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens < 450


def test_nonstreaming_disconnect_stops_generation(server, engine):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 470, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    assert server.wait_idle(10)
    assert engine.finish_reason is None                       # closed early, not "length"
    assert engine.stats()["last"]["gen_tokens"] < 470


def test_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    assert 'hotexperts_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["hotexperts_prompt_tokens_total"] > 0 and values["hotexperts_generation_tokens_total"] >= 3
    assert values["hotexperts_time_to_first_token_seconds_count"] >= 1
    assert values["hotexperts_generation_tokens_per_second"] > 0
    assert values["hotexperts_queue_depth"] == 0 and values["hotexperts_requests_running"] == 0
    assert "hotexperts_vram_allocated_bytes" in values


def test_cache_metrics_with_hot_expert_cache():
    import torch

    from hotexperts.engine.engine import Engine
    from hotexperts.experts.placement import Placement

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eng = Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu",
                          placement=Placement.parse("hot:4"), max_context=64)
        with serve(eng) as s:
            r = httpx.post(s.url + "/v1/completions", timeout=60,
                           json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200
            text = httpx.get(s.url + "/metrics").text
    finally:
        torch.set_num_threads(threads)
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["hotexperts_cache_hits_total"] + values["hotexperts_cache_misses_total"] > 0
    assert 0 <= values["hotexperts_cache_hit_rate"] <= 1 and values["hotexperts_cache_slots"] == 16
    assert 'hotexperts_cache_layer_swaps_total{layer="0"}' in text
    assert "hotexperts_cache_bytes_moved_total" in values
