"""The HTTP API over a `--parallel N` engine (server/batch_worker.BatchWorker): concurrent requests decoded
together give the same greedy text as each alone (streaming and not, chat and completions), each keeps its
own sampling, stop strings and max_tokens; more requests than slots wait and finish; a disconnect or a time
limit frees the slot."""

from __future__ import annotations

import asyncio
import functools
import json
import time

import httpx
import pytest
import torch
from live_server import MODEL, serve, tiny_engine

from hotexperts.engine.engine import Engine
from hotexperts.engine.sampling import SamplingParams
from hotexperts.engine.textstream import TextStream
from hotexperts.server.batch_worker import BatchWorker

PROMPTS = ["The quick brown fox", "Once upon a time", "Name a color.", "1 2 3 4", "Hello", "Why is the sky"]


@functools.cache
def parallel_engine(n: int) -> Engine:
    return Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu", max_context=512, parallel=n)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def alone(prompt: str, max_tokens: int, stop=(), **sampling) -> str:
    """The text the one-request engine gives (its own engine: never busy with the server's requests)."""
    eng = tiny_engine()
    params = SamplingParams(max_tokens=max_tokens, stop=tuple(stop), **({"temperature": 0} | sampling))
    return "".join(TextStream(eng.tokenizer, stop).run(eng.generate(eng.tokenizer.encode(prompt), params)))


async def complete(c: httpx.AsyncClient, prompt: str, max_tokens: int, stream: bool, **extra) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    body |= extra
    if not stream:
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return {"text": choice["text"], "finish": choice["finish_reason"]}
    text, finish = "", None
    async with c.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice.get("text") or ""
                finish = choice.get("finish_reason") or finish
    return {"text": text, "finish": finish}


def test_the_server_batches_with_parallel_slots():
    with serve(parallel_engine(4)) as s:
        assert isinstance(s.state.worker, BatchWorker)
        assert httpx.get(s.url + "/health").json()["slots"] == 4


@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_requests_give_the_text_each_gives_alone(n):
    lengths = [12, 5, 9, 16, 7, 11]
    eng = parallel_engine(n)
    before = eng.batch.timings.rows, eng.batch.timings.steps

    async def main(s):
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            return await asyncio.gather(*(complete(c, p, m, stream=i % 2 == 0)
                                          for i, (p, m) in enumerate(zip(PROMPTS, lengths, strict=True))))

    with serve(eng, max_queue=16) as s:
        got = asyncio.run(main(s))
        assert s.wait_idle()
    want = [alone(p, m) for p, m in zip(PROMPTS, lengths, strict=True)]
    assert [g["text"] for g in got] == want
    assert [g["finish"] for g in got] == ["length"] * len(PROMPTS)
    rows, steps = eng.batch.timings.rows - before[0], eng.batch.timings.steps - before[1]
    assert rows > steps                                   # steps really carried several requests
    assert sorted(eng.batch.free_slots) == list(range(n)) and not eng.batch.running


def test_each_request_keeps_its_stop_string_and_sampling():
    ref = alone(PROMPTS[0], 12)
    stop = ref[len(ref) // 2: len(ref) // 2 + 2]
    seeded = {"temperature": 0.9, "seed": 11, "top_k": 40}

    async def main(s):
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            return await asyncio.gather(complete(c, PROMPTS[0], 12, True, stop=[stop]),
                                        complete(c, PROMPTS[1], 10, False, **seeded),
                                        complete(c, PROMPTS[2], 8, True))

    with serve(parallel_engine(4)) as s:
        cut, sampled, plain = asyncio.run(main(s))
    assert cut == {"text": alone(PROMPTS[0], 12, stop=(stop,)), "finish": "stop"}
    assert sampled["text"] == alone(PROMPTS[1], 10, **seeded)
    assert plain["text"] == alone(PROMPTS[2], 8)


def test_a_disconnect_frees_the_slot_while_others_continue():
    eng = parallel_engine(2)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 450, "temperature": 0, "stream": True}

    async def main(s):
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            other = asyncio.create_task(complete(c, PROMPTS[1], 40, False))
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text"):
                        break                              # leave after the first text
            return await other

    with serve(eng) as s:
        t0 = time.monotonic()
        other = asyncio.run(main(s))
        assert s.wait_idle(20) and time.monotonic() - t0 < 30
        assert sorted(eng.batch.free_slots) == [0, 1]
    assert other["text"] == alone(PROMPTS[1], 40)


def test_a_time_limit_ends_the_request_with_length():
    async def main(s):
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            return await asyncio.gather(complete(c, PROMPTS[0], 450, False), complete(c, PROMPTS[1], 4, True))

    with serve(parallel_engine(2), request_timeout=0.5) as s:
        long, short = asyncio.run(main(s))
        assert s.wait_idle(10)
    assert long["finish"] == "length" and len(long["text"]) < len(alone(PROMPTS[0], 450))
    assert short["text"] == alone(PROMPTS[1], 4)


def test_logprobs_of_a_batched_request_are_its_own():
    messages = [{"role": "user", "content": "Name a color."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}

    async def main(s):
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            lp, _ = await asyncio.gather(c.post("/v1/chat/completions", json=body),
                                         complete(c, PROMPTS[3], 12, True))
            return lp.json()

    with serve(parallel_engine(2)) as s:
        out = asyncio.run(main(s))
    content = out["choices"][0]["logprobs"]["content"]
    text = out["choices"][0]["message"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] == 6
    assert "".join(e["token"] for e in content) == text
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6
               for e in content)
    eng = tiny_engine()
    ids = eng.tokenizer.encode_chat(messages)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    want = "".join(TextStream(eng.tokenizer).run(eng.generate(ids, greedy)))
    assert text == want
