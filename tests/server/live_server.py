"""Test helpers: the `engine` fixture and a real uvicorn on 127.0.0.1 (random free port, in a thread).

    from live_server import MODEL, engine_fixture, serve   # noqa: F401  (imported = fixture "engine")
    with serve(engine, api_key="k", max_queue=1) as s:    # ServerSettings fields as keywords
        s.url, s.state (the app's Server: worker, metrics), s.wait_idle()

No conftest.py here on purpose: tests/models imports names `from conftest`, and a second conftest module
would shadow it when the whole suite is collected.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time

import pytest
import torch
import uvicorn

from hotexperts.engine.engine import Engine
from hotexperts.server.app import ServerSettings, create_app, uvicorn_limits

MODEL = "tiny"


@functools.cache
def tiny_engine() -> Engine:
    """preset:tiny-qwen3-moe on CPU, float32, all experts dense; loaded once per process."""
    return Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu", max_context=512)


@pytest.fixture(scope="module", name="engine")
def engine_fixture():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)               # a tiny model: one thread is fastest and leaves CI cores free
    try:
        yield tiny_engine()
    finally:
        torch.set_num_threads(threads)


class Running:
    def __init__(self, app, server: uvicorn.Server, thread: threading.Thread, port: int):
        self.app, self.uvicorn, self.thread, self.port = app, server, thread, port
        self.url = f"http://127.0.0.1:{port}"
        self.state = app.state.server

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once nothing waits and the worker is not generating."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.state.worker.depth == 0 and not self.state.worker.busy:
                return True
            time.sleep(0.02)
        return False


@contextlib.contextmanager
def serve(engine, **settings):
    app = create_app(engine, ServerSettings(model_name=MODEL, **settings))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
                            **uvicorn_limits(app.state.server.settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn")
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Running(app, server, thread, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"
