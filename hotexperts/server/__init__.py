"""hotexperts.server: the OpenAI-compatible HTTP server (`hotexperts serve`, docs/server.md).

app.py (routes, CLI) -> protocol.py (request parsing) -> queue.py (one engine worker thread, FIFO queue)
-> events.py (loop side of a job) -> stream.py (chunks, SSE, fold); metrics.py (Prometheus); errors.py.
"""
