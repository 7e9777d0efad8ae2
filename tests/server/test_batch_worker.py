"""BatchWorker (server/batch_worker.py) with a fake batch decoder: FIFO admission up to N slots, never more
than N running, one terminal event per job, cancel while waiting and while running, the end of a stop
string, the worker's stop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from hotexperts.engine.sampling import SamplingParams
from hotexperts.server.batch_worker import BatchWorker, PushText
from hotexperts.server.queue import Job


class _Decoder:
    def step(self, tok: int) -> str:
        return f"{tok} "


class _Tok:
    def stream(self):
        return _Decoder()


class FakeSeq:
    def __init__(self, first: int, max_tokens: int):
        self.first, self.max_tokens = first, max_tokens
        self.token, self.tokens, self.finish_reason = None, [], None
        self.sampler = type("S", (), {"logprobs": []})()

    @property
    def finished(self):
        return self.finish_reason is not None

    def produce(self):
        self.token = self.first * 100 + len(self.tokens)
        self.tokens.append(self.token)
        if len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"


class FakeBatch:
    """Request i produces i*100, i*100+1, ...; records admissions and the most rows of any step."""

    def __init__(self, slots: int, delay: float = 0.002):
        self.num_slots, self.delay, self.running, self.admitted, self.widest = slots, delay, [], [], 0
        self.gate = threading.Event()
        self.gate.set()

    def add(self, ids, params, stop_ids=()):
        assert len(self.running) < self.num_slots
        self.admitted.append(ids[0])
        seq = FakeSeq(ids[0], params.max_tokens)
        seq.produce()
        if not seq.finished:
            self.running.append(seq)
        return seq

    def step(self):
        self.gate.wait()
        time.sleep(self.delay)
        self.widest = max(self.widest, len(self.running))
        for seq in list(self.running):
            seq.produce()
            if seq.finished:
                self.running.remove(seq)

    def release(self, seq, reason="cancelled"):
        if seq in self.running:
            self.running.remove(seq)
            seq.finish_reason, seq.token = reason, None


class FakeEngine:
    def __init__(self, slots: int):
        self.batch, self.tokenizer, self.eos_ids = FakeBatch(slots), _Tok(), frozenset()

    def stats(self):
        return {}


async def collect(job: Job) -> list:
    out = []
    while True:
        out.append(await asyncio.wait_for(job.events.get(), 10))
        if out[-1].kind in ("end", "error"):
            return out


def text(events) -> str:
    return "".join(e.text for e in events if e.kind == "delta")


def test_fifo_admission_up_to_n_slots_and_one_end_each():
    async def main():
        eng = FakeEngine(slots=2)
        w = BatchWorker(eng, max_queue=8)
        loop = asyncio.get_running_loop()
        jobs = [Job([i], SamplingParams(max_tokens=3 + i), loop) for i in range(1, 6)]
        for j in jobs:
            w.submit(j)
        w.start()
        results = [await collect(j) for j in jobs]
        w.stop()
        assert eng.batch.admitted == [1, 2, 3, 4, 5] and eng.batch.widest == 2
        for i, evs in enumerate(results, 1):
            assert [e.kind for e in evs][0] == "start" and evs[-1].kind == "end"
            assert text(evs) == "".join(f"{i * 100 + k} " for k in range(3 + i))
            assert evs[-1].finish_reason == "length" and evs[-1].completion_tokens == 3 + i
    asyncio.run(main())


def test_cancel_waiting_and_running_jobs_frees_their_slots():
    async def main():
        eng = FakeEngine(slots=1)
        w = BatchWorker(eng, max_queue=8)
        loop = asyncio.get_running_loop()
        running, waiting, last = (Job([i], SamplingParams(max_tokens=10_000), loop) for i in (1, 2, 3))
        last.params = SamplingParams(max_tokens=2)
        for j in (running, waiting, last):
            w.submit(j)
        w.start()
        assert (await asyncio.wait_for(running.events.get(), 10)).kind == "start"
        w.cancel(waiting)                                    # still queued: ends at once
        w.cancel(running)                                    # generating: leaves before the next step
        ends = [(await collect(j))[-1] for j in (running, waiting, last)]
        w.stop()
        assert [e.finish_reason for e in ends] == ["cancelled", "cancelled", "length"]
        assert eng.batch.admitted == [1, 3] and not eng.batch.running
    asyncio.run(main())


def test_stop_ends_every_job():
    async def main():
        eng = FakeEngine(slots=2)
        eng.batch.gate.clear()                               # steps block until stop
        w = BatchWorker(eng, max_queue=8)
        loop = asyncio.get_running_loop()
        jobs = [Job([i], SamplingParams(max_tokens=50), loop) for i in (1, 2, 3)]
        for j in jobs:
            w.submit(j)
        w.start()
        while len(eng.batch.admitted) < 2:
            await asyncio.sleep(0.01)
        stopper = threading.Thread(target=w.stop)
        stopper.start()
        eng.batch.gate.set()
        ends = [(await collect(j))[-1] for j in jobs]
        stopper.join(10)
        assert all(e.kind == "end" and e.finish_reason == "cancelled" for e in ends) and not w.alive
    asyncio.run(main())


def test_the_tokens_per_second_metric_is_the_batched_request_own():
    """The engine's one-request stats ("last") are stale under batching (here: a made-up 12345 tok/s): the
    gauge reads the finished request's own decode speed, its tokens after the first over the time since."""
    from hotexperts.server.metrics import Metrics

    async def main():
        eng = FakeEngine(slots=2)
        eng.stats = lambda: {"last": {"decode_steps": 3, "gen_tok_per_s": 12345.0}}
        m = Metrics(lambda: (0, False), lambda: None)
        w = BatchWorker(eng, max_queue=8, on_finish=lambda job, ev: m.finished(job, ev, eng.stats(),
                                                                                time.monotonic()))
        job = Job([1], SamplingParams(max_tokens=6), asyncio.get_running_loop())
        w.submit(job)
        w.start()
        await collect(job)
        w.stop()
        return job, m.tps._value.get()

    job, gauge = asyncio.run(main())
    assert job.decode_tok_per_s is not None and 0 < job.decode_tok_per_s < 1 / 0.002   # 5 steps of >= 2 ms
    assert gauge == pytest.approx(job.decode_tok_per_s)


def test_push_text_holds_back_stop_string_prefixes():
    t = PushText(_Tok(), stop=("2 3",))
    assert t.push(1) == "1 " and t.push(2) == "" and t.push(3) == "" and t.stopped
    assert t.close() == "" and t.tokens == 3
