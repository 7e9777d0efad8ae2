"""The engine worker: one thread runs one generation at a time, fed by a bounded FIFO queue.

    worker = EngineWorker(engine, max_queue=32, on_finish=callback)
    worker.start()
    job = Job(prompt_ids, params, loop=asyncio.get_running_loop(), deadline=time.monotonic() + 600)
    worker.submit(job)              # QueueFull when max_queue requests already wait
    ev = await job.events.get()     # Event: start | delta (text, logprobs) | end (finish_reason, usage)
                                    #   | error
    worker.cancel(job)              # client gone: dropped from the queue, or stopped between two tokens
    worker.stop()                   # cancels everything, joins the thread

This worker decodes requests one at a time in arrival order (fair FIFO): the engine is not thread-safe.
With `--parallel N` > 1 the server uses server/batch_worker.BatchWorker instead (the same interface and
events): up to N requests decoded together in one step. Every job that was submitted gets exactly one
terminal event ("end" or "error"), cancelled ones included (finish_reason "cancelled"). A job whose
deadline passes while it waits gets a 503 error; one whose deadline passes while it generates ends
normally with finish_reason "length".
The worker thread talks to the event loop only through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from hotexperts.engine.sampling import SamplingParams
from hotexperts.engine.textstream import TextStream
from hotexperts.errors import ExpertComputeError, HotExpertsError
from hotexperts.server.errors import APIError

log = logging.getLogger("hotexperts.server")


class QueueFull(Exception):
    pass


@dataclass
class Event:
    kind: str                          # start | delta | end | error
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: APIError | None = None
    logprobs: list[dict] | None = None  # delta: the tokens behind this text (request asked for logprobs)


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None                  # time.monotonic() limit, None = no limit
    arrived: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_token_s: float | None = None             # time to first token, from arrival
    started: float | None = None                   # time.monotonic() its generation began (BatchWorker)
    decode_tok_per_s: float | None = None          # its own decode speed (BatchWorker), else None
    done: bool = False

    def emit(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        except RuntimeError:                       # the event loop is closed (server shut down)
            self.cancelled.set()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def logprob_entry(tokenizer, token: int, logprob: float) -> dict:
    """{"token", "logprob", "bytes"} as OpenAI's; -inf (JSON has none) is reported as -9999.0 like theirs."""
    text = tokenizer.decode([token])
    return {"token": text, "logprob": max(float(logprob), -9999.0), "bytes": list(text.encode("utf-8"))}


class EngineWorker:
    def __init__(self, engine, max_queue: int = 32, on_finish: Callable[[Job, Event], None] | None = None):
        self.engine, self.max_queue, self.on_finish = engine, max_queue, on_finish
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self.running: Job | None = None
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="hotexperts-engine", daemon=True)
        self.durations: deque[float] = deque(maxlen=16)   # recent request seconds (Retry-After estimate)

    # ---- event-loop side ----
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._waiting) + ([self.running] if self.running else []):
                job.cancelled.set()
            self._cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job`: removed at once if it still waits (its place is free), else stopped after the
        current token. Idempotent; a finished job is left alone."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, Event("end", finish_reason="cancelled"))

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self.running is not None

    @property
    def running_count(self) -> int:
        return int(self.running is not None)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: the queue's expected drain time, at least 1."""
        mean = sum(self.durations) / len(self.durations) if self.durations else 1.0
        return max(1, min(600, round(mean * (self.depth + 1))))

    # ---- worker thread ----
    def _loop(self) -> None:
        dev = getattr(self.engine, "device", None)
        if isinstance(dev, torch.device) and dev.type == "cuda":
            torch.cuda.set_device(dev)               # streams / graphs of this thread on the engine's GPU
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for job in list(self._waiting):
                        self._finish(job, Event("end", finish_reason="cancelled"))
                    self._waiting.clear()
                    return
                job = self.running = self._waiting.popleft()
            try:
                self._finish(job, self._run(job))
            finally:
                with self._cond:
                    self.running = None

    def _finish(self, job: Job, ev: Event) -> None:
        if job.done:
            return
        job.done = True
        job.emit(ev)
        if self.on_finish is not None:
            try:
                self.on_finish(job, ev)
            except Exception:
                log.exception("on_finish hook failed")

    def _run(self, job: Job) -> Event:
        """Generate one job; returns its terminal event (emitted by the caller)."""
        if job.cancelled.is_set():
            return Event("end", finish_reason="cancelled")
        if job.expired():
            return Event("error", error=APIError(503, "the request timed out while waiting in the queue",
                                                 code="queue_timeout", type="timeout_error"))
        t0 = job.started = time.monotonic()
        try:
            return self._generate(job)
        except ExpertComputeError as e:
            log.error("expert computation failed: %s", e)
            return Event("error", error=APIError(500, str(e), code="expert_compute_error"))
        except HotExpertsError as e:
            return Event("error", error=APIError(400, str(e), code="invalid_request"))
        except Exception as e:
            log.exception("generation failed")
            return Event("error", error=APIError(500, f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self.durations.append(time.monotonic() - t0)

    def _generate(self, job: Job) -> Event:
        tokens = self.engine.generate(job.prompt_ids, job.params)     # ContextLengthError here
        job.emit(Event("start", prompt_tokens=len(job.prompt_ids)))
        stream, cut, sent = TextStream(self.engine.tokenizer, job.params.stop), [], 0
        for delta in stream.run(self._guard(job, tokens, cut)):
            job.emit(Event("delta", text=delta, logprobs=self._logprobs(job, sent, stream.tokens)))
            sent = stream.tokens
        if job.params.logprobs is not None and sent < stream.tokens and stream.finish_reason != "stop":
            job.emit(Event("delta", logprobs=self._logprobs(job, sent, stream.tokens)))   # text-less tokens
        reason = (cut[0] if cut else None) or stream.finish_reason or self.engine.finish_reason or "stop"
        return Event("end", finish_reason=reason, prompt_tokens=len(job.prompt_ids),
                     completion_tokens=stream.tokens)

    def _logprobs(self, job: Job, start: int, end: int) -> list[dict] | None:
        """OpenAI chat-shaped entries of tokens start..end-1 (None when the request did not ask)."""
        if job.params.logprobs is None:
            return None
        tok = self.engine.tokenizer
        return [logprob_entry(tok, t, lp) | {"top_logprobs": [logprob_entry(tok, a, alp) for a, alp in alts]}
                for t, lp, alts in getattr(self.engine, "token_logprobs", [])[start:end]]

    @staticmethod
    def _guard(job: Job, tokens: Iterator[int], cut: list) -> Iterator[int]:
        """Pass tokens through; between two tokens stop on cancel ("cancelled") or deadline ("length")."""
        try:
            for tok in tokens:
                if job.first_token_s is None:
                    job.first_token_s = time.monotonic() - job.arrived
                yield tok
                if job.cancelled.is_set():
                    cut.append("cancelled")
                    return
                if job.expired():
                    cut.append("length")
                    return
        finally:
            tokens.close()
