"""EngineWorker with a fake engine: FIFO order, bounded queue, cancel (waiting and running), deadlines,
one terminal event per job, clean stop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import ContextLengthError
from hotexperts.server.errors import APIError
from hotexperts.server.events import JobEvents
from hotexperts.server.queue import EngineWorker, Job, QueueFull


class _Decoder:
    def step(self, tok: int) -> str:
        return f"{tok} "


class FakeEngine:
    """Yields prompt[0]*100 + i for i < max_tokens, sleeping `delay` per token; records the order."""

    def __init__(self, delay: float = 0.005):
        self.delay, self.order, self.finish_reason = delay, [], None
        self.tokenizer = type("Tok", (), {"stream": lambda self: _Decoder()})()
        self.gate = threading.Event()
        self.gate.set()

    def generate(self, ids, params):
        if ids[0] < 0:
            raise ContextLengthError("too long")
        return self._gen(ids, params)

    def _gen(self, ids, params):
        self.order.append(ids[0])
        self.finish_reason = None
        for i in range(params.max_tokens):
            self.gate.wait()
            time.sleep(self.delay)
            yield ids[0] * 100 + i
        self.finish_reason = "length"

    def stats(self):
        return {}


async def collect(job: Job) -> list:
    out = []
    while True:
        ev = await asyncio.wait_for(job.events.get(), 10)
        out.append(ev)
        if ev.kind in ("end", "error"):
            return out


def text(events) -> str:
    return "".join(e.text for e in events if e.kind == "delta")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_fifo_order_and_terminal_events():
    async def main():
        eng = FakeEngine()
        w = EngineWorker(eng, max_queue=8)
        loop = asyncio.get_running_loop()
        jobs = [Job([i], SamplingParams(max_tokens=3), loop) for i in range(1, 6)]
        for j in jobs:
            w.submit(j)
        w.start()
        results = [await collect(j) for j in jobs]
        w.stop()
        assert eng.order == [1, 2, 3, 4, 5]
        for i, evs in enumerate(results, 1):
            assert [e.kind for e in evs][0] == "start"
            assert evs[-1].kind == "end" and evs[-1].finish_reason == "length"
            assert evs[-1].completion_tokens == 3 and evs[-1].prompt_tokens == 1
            assert text(evs) == "".join(f"{i * 100 + k} " for k in range(3))
        assert not w.thread.is_alive()
    run(main())


def test_queue_full_and_cancel_frees_place():
    async def main():
        eng = FakeEngine()
        eng.gate.clear()                       # the running job blocks on its first token
        w = EngineWorker(eng, max_queue=2)
        loop = asyncio.get_running_loop()
        w.start()
        running = Job([1], SamplingParams(max_tokens=5), loop)
        w.submit(running)
        while not w.busy:
            await asyncio.sleep(0.005)
        a, b = Job([2], SamplingParams(max_tokens=2), loop), Job([3], SamplingParams(max_tokens=2), loop)
        w.submit(a)
        w.submit(b)
        with pytest.raises(QueueFull):
            w.submit(Job([4], SamplingParams(max_tokens=2), loop))
        w.cancel(a)                            # waiting: removed at once, terminal event "cancelled"
        assert w.depth == 1
        assert (await collect(a))[-1].finish_reason == "cancelled"
        c = Job([5], SamplingParams(max_tokens=2), loop)
        w.submit(c)                            # the freed place is usable
        w.cancel(running)                      # running: stops after the current token
        eng.gate.set()
        evs = await collect(running)
        assert evs[-1].finish_reason == "cancelled" and evs[-1].completion_tokens == 1
        assert (await collect(b))[-1].finish_reason == "length"
        assert (await collect(c))[-1].finish_reason == "length"
        assert eng.order == [1, 3, 5]
        w.stop()
    run(main())


def test_deadlines_and_errors():
    async def main():
        eng = FakeEngine(delay=0.02)
        w = EngineWorker(eng, max_queue=4)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        slow = Job([1], SamplingParams(max_tokens=1000), loop, deadline=now + 0.2)
        late = Job([2], SamplingParams(max_tokens=2), loop, deadline=now + 0.05)
        bad = Job([-1], SamplingParams(max_tokens=2), loop)
        for j in (slow, late, bad):
            w.submit(j)
        w.start()
        evs = await collect(slow)
        assert evs[-1].finish_reason == "length" and 1 <= evs[-1].completion_tokens < 100
        err = (await collect(late))[-1]
        assert err.kind == "error" and err.error.status == 503 and err.error.code == "queue_timeout"
        err = (await collect(bad))[-1]
        assert err.kind == "error" and err.error.status == 400 and "too long" in err.error.message
        w.stop()
    run(main())


def test_stop_cancels_waiting_and_running():
    async def main():
        eng = FakeEngine(delay=0.01)
        w = EngineWorker(eng, max_queue=4)
        loop = asyncio.get_running_loop()
        jobs = [Job([i], SamplingParams(max_tokens=10_000), loop) for i in (1, 2)]
        for j in jobs:
            w.submit(j)
        w.start()
        while not w.busy:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(w.stop)
        assert not w.thread.is_alive()
        for j in jobs:
            assert (await collect(j))[-1].finish_reason == "cancelled"
        with pytest.raises(QueueFull):
            w.submit(Job([3], SamplingParams(), loop))
    run(main())


class FakeRequest:
    def __init__(self, gone: bool):
        self.gone = gone

    async def is_disconnected(self) -> bool:
        return self.gone


def test_waiting_request_times_out_or_leaves():
    async def main():
        eng = FakeEngine()
        eng.gate.clear()
        w = EngineWorker(eng, max_queue=4)
        loop = asyncio.get_running_loop()
        w.start()
        blocker = Job([1], SamplingParams(max_tokens=5), loop)
        w.submit(blocker)
        while not w.busy:
            await asyncio.sleep(0.005)
        late = Job([2], SamplingParams(max_tokens=2), loop, deadline=time.monotonic() + 0.1)
        w.submit(late)
        with pytest.raises(APIError) as e:
            await JobEvents(w, late).until_started(FakeRequest(gone=False))
        assert e.value.status == 503 and e.value.code == "queue_timeout" and "Retry-After" in e.value.headers
        assert w.depth == 0
        gone = Job([3], SamplingParams(max_tokens=2), loop)
        w.submit(gone)
        assert await JobEvents(w, gone).until_started(FakeRequest(gone=True)) is None
        assert w.depth == 0 and w.busy
        eng.gate.set()
        events = JobEvents(w, blocker)
        assert (await events.until_started(FakeRequest(gone=False))).kind == "start"
        assert [ev.kind async for ev in events][-1] == "end"
        w.stop()
        assert eng.order == [1]
    run(main())
