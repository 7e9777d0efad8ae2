"""The event-loop side of one job: read its events, notice a client that left, free its place.

    events = job_events(worker, job)
    await events.until_started(request)   # Event("start"); None if the client left; raises APIError
    async for ev in events: ...           # deltas, then one "end" (or an "error" event)
    events.watch(request)                 # (non-streaming) poll for a disconnect while iterating
    JobStreamingResponse(..., on_close=events.close)   # streaming: cancel the job when the response ends

While a request waits (before "start") the connection is polled every POLL_S seconds: a client that
disconnects is removed from the queue, and one whose deadline passes gets 503 (code queue_timeout).
During streaming Starlette notices the disconnect and ends the response; `close()` then cancels the job
and the worker stops before the next token.
"""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import StreamingResponse

from hotexperts.server.errors import APIError
from hotexperts.server.queue import EngineWorker, Event, Job

POLL_S = 0.2
TERMINAL = ("end", "error")


class JobEvents:
    def __init__(self, worker: EngineWorker, job: Job):
        self.worker, self.job = worker, job
        self._request = None
        self._finished = False
        self._polled = time.monotonic()

    def close(self) -> None:
        """Cancel the job unless it already finished (idempotent)."""
        self.worker.cancel(self.job)

    def watch(self, request) -> None:
        self._request = request

    async def until_started(self, request) -> Event | None:
        try:
            while True:
                ev = await self._get(request, waiting=True)
                if ev.kind == "start":
                    return ev
                if ev.kind == "error":
                    raise ev.error
                if ev.kind == "end":
                    return None
        except BaseException:
            self.close()
            raise

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        while not self._finished:
            ev = await self._get(self._request)
            self._finished = ev.kind in TERMINAL
            yield ev

    async def _get(self, request, waiting: bool = False) -> Event:
        """The next event; with `request`, check the connection (and the queue deadline) every POLL_S."""
        while True:
            if request is None:
                return await self.job.events.get()
            now = time.monotonic()
            if now - self._polled < POLL_S:
                try:
                    return await asyncio.wait_for(self.job.events.get(), POLL_S - (now - self._polled))
                except TimeoutError:
                    pass
            self._polled = time.monotonic()
            if await request.is_disconnected():
                self.close()                           # the worker answers with end(cancelled)
                self._request = request = None
            elif waiting and self.job.expired() and self.worker.running is not self.job \
                    and self.job.started is None:
                raise APIError(503, "the request timed out while waiting in the queue", code="queue_timeout",
                               type="timeout_error", headers={"Retry-After": str(self.worker.retry_after())})


def job_events(worker: EngineWorker, job: Job) -> JobEvents:
    return JobEvents(worker, job)


class JobStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls `on_close()` however it ends (done, client gone, cancelled)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
