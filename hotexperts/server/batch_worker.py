"""The batching engine worker (`--parallel N` > 1): one thread steps every running request together.

    worker = BatchWorker(engine, max_queue=32, on_finish=callback)   # engine.batch: engine/batch.BatchDecoder
    (the interface of queue.EngineWorker: start, submit, cancel, stop, depth, busy, alive, retry_after)

Each turn of the loop: admit waiting jobs in arrival order (fair FIFO) while a slot is free, each prefilled
in its slot (batch-1) and given its first token; then one decode step of all running jobs (B <= N tokens,
engine/batch.py). Every job keeps its own sampling parameters (its own Sampler), stop ids, stop strings,
max_tokens, deadline and streaming text (the push form of engine/textstream.TextStream: the tokenizer's
stream decoder and a StopMatcher). A cancel (client gone) or a passed deadline frees the slot before the
next step: finish_reason "cancelled" or "length", as the one-request worker. A newcomer's prefill runs between
two steps, so running requests pause for it (no chunked prefill interleaving yet).
Events and terminal-event guarantees are EngineWorker's (server/queue.py): every submitted job gets exactly
one "end" or "error"; a failed batched step (an expert computation error) ends every running job with a 500.
A job that ends normally carries its own decode speed (decode_speed: job.decode_tok_per_s) for the metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from hotexperts.engine.textstream import StopMatcher, new_stream_decoder
from hotexperts.errors import ExpertComputeError, HotExpertsError
from hotexperts.server.errors import APIError
from hotexperts.server.queue import EngineWorker, Event, Job, logprob_entry

log = logging.getLogger("hotexperts.server")


class PushText:
    """A job's streaming text, one token at a time: decoded deltas with stop strings held back."""

    def __init__(self, tokenizer, stop):
        self.decoder, self.matcher = new_stream_decoder(tokenizer), StopMatcher(tuple(stop))
        self.tokens = 0                    # tokens consumed (OpenAI completion_tokens)

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def push(self, token: int) -> str:
        self.tokens += 1
        return self.matcher.feed(self.decoder.step(token))

    def close(self) -> str:
        """The text held back at the end (none past a stop string)."""
        flush = getattr(self.decoder, "flush", None)
        out = self.matcher.feed(flush() if callable(flush) else "")
        return out if self.matcher.stopped else out + self.matcher.flush()


@dataclass(eq=False)
class Active:
    """A running job: its sequence in the batch decoder and its text."""
    job: Job
    seq: object                            # engine/batch.Sequence
    text: PushText
    sent: int = 0                          # tokens whose logprobs were emitted


def decode_speed(job: Job, tokens: int, now: float) -> float | None:
    """The job's decode tok/s as its client saw it: the tokens after its first (that one came from its
    prefill) over the time since the first, pauses for other requests' prefills included. The engine's
    one-request stats ("last") never see a batched request, so the server's metrics read this instead.
    None: nothing was decoded."""
    if job.first_token_s is None or tokens < 2:
        return None
    seconds = now - job.arrived - job.first_token_s
    return (tokens - 1) / seconds if seconds > 0 else None


class BatchWorker(EngineWorker):
    def __init__(self, engine, max_queue: int = 32, on_finish=None):
        super().__init__(engine, max_queue, on_finish)
        self.batch = engine.batch
        self.active: list[Active] = []

    @property
    def busy(self) -> bool:
        return bool(self.active)

    @property
    def running_count(self) -> int:
        return len(self.active)

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            for a in self.active:
                a.job.cancelled.set()
        super().stop(timeout)

    def retry_after(self) -> int:
        """The queue drains N requests at a time."""
        mean = sum(self.durations) / len(self.durations) if self.durations else 1.0
        return max(1, min(600, round(mean * (self.depth // self.batch.num_slots + 1))))

    # ---- worker thread ----
    def _loop(self) -> None:
        dev = getattr(self.engine, "device", None)
        if isinstance(dev, torch.device) and dev.type == "cuda":
            torch.cuda.set_device(dev)
        while True:
            admitted = self._next_jobs()
            if admitted is None:
                return
            for job in admitted:
                self._admit(job)
            self._sweep()
            if self.batch.running:
                self._step()

    def _next_jobs(self) -> list[Job] | None:
        """Wait for work; take waiting jobs (FIFO) up to the free slots. None: stopping (all ended)."""
        with self._cond:
            while not self._waiting and not self.active and not self._stopping:
                self._cond.wait()
            if self._stopping:
                for job in list(self._waiting):
                    self._finish(job, Event("end", finish_reason="cancelled"))
                self._waiting.clear()
                for a in list(self.active):
                    self._end(a, "cancelled")
                return None
            free = self.batch.num_slots - len(self.active)
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]

    def _admit(self, job: Job) -> None:
        """Prefill a newcomer into a free slot and hand out its first token."""
        if job.cancelled.is_set():
            return self._finish(job, Event("end", finish_reason="cancelled"))
        if job.expired():
            return self._finish(job, Event("error", error=APIError(
                503, "the request timed out while waiting in the queue", code="queue_timeout",
                type="timeout_error")))
        job.started = time.monotonic()
        try:
            seq = self.batch.add(job.prompt_ids, job.params, stop_ids=self.engine.eos_ids)
        except Exception as e:
            return self._finish(job, self._error_event(e))
        job.emit(Event("start", prompt_tokens=len(job.prompt_ids)))
        a = Active(job, seq, PushText(self.engine.tokenizer, job.params.stop))
        with self._cond:
            self.active.append(a)
        self._deliver(a)

    def _step(self) -> None:
        try:
            self.batch.step()
        except Exception as e:
            ev = self._error_event(e)
            for a in list(self.active):
                self._end(a, None, ev)
            return
        for a in list(self.active):
            self._deliver(a)

    def _sweep(self) -> None:
        """Cancelled or timed-out jobs leave before the next step (their slots are freed)."""
        for a in list(self.active):
            if a.job.cancelled.is_set():
                self._end(a, "cancelled")
            elif a.job.expired():
                self._end(a, "length")

    def _deliver(self, a: Active) -> None:
        """The job's latest token as text (stop strings held back); its end when it finished."""
        seq, job = a.seq, a.job
        if seq.token is not None:
            if job.first_token_s is None:
                job.first_token_s = time.monotonic() - job.arrived
            delta = a.text.push(seq.token)
            if delta:
                job.emit(Event("delta", text=delta, logprobs=self._logprobs_of(a)))
            if a.text.stopped:
                return self._end(a, "stop")
        if seq.finished:
            self._end(a, seq.finish_reason)

    def _logprobs_of(self, a: Active) -> list[dict] | None:
        if a.job.params.logprobs is None:
            return None
        entries = a.seq.sampler.logprobs[a.sent:a.text.tokens]
        a.sent = a.text.tokens
        tok = self.engine.tokenizer
        return [logprob_entry(tok, t, lp) | {"top_logprobs": [logprob_entry(tok, x, xlp) for x, xlp in alts]}
                for t, lp, alts in entries]

    def _end(self, a: Active, reason: str | None, error: Event | None = None) -> None:
        """Free the job's slot and send its terminal event (its held-back text first)."""
        self.batch.release(a.seq, reason or "cancelled")
        with self._cond:
            if a in self.active:
                self.active.remove(a)
        job = a.job
        if error is None:                  # past a stop string nothing more is sent (as TextStream)
            rest = a.text.close() if not a.text.stopped else ""
            logprobs = self._logprobs_of(a) if not a.text.stopped else None
            if rest or logprobs:
                job.emit(Event("delta", text=rest, logprobs=logprobs))
            error = Event("end", finish_reason=reason, prompt_tokens=len(job.prompt_ids),
                          completion_tokens=a.text.tokens)
            job.decode_tok_per_s = decode_speed(job, a.text.tokens, time.monotonic())
        self.durations.append(time.monotonic() - (job.started or job.arrived))
        self._finish(job, error)

    @staticmethod
    def _error_event(e: Exception) -> Event:
        if isinstance(e, ExpertComputeError):
            log.error("expert computation failed: %s", e)
            return Event("error", error=APIError(500, str(e), code="expert_compute_error"))
        if isinstance(e, HotExpertsError):
            return Event("error", error=APIError(400, str(e), code="invalid_request"))
        log.exception("generation failed")
        return Event("error", error=APIError(500, f"generation failed: {type(e).__name__}: {e}"))
