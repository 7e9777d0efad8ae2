"""`hotexperts serve`: flag validation, and the real command in a subprocess (tiny preset on CPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from hotexperts.cli import build_parser
from hotexperts.cli.serve import settings_from_args
from hotexperts.errors import HotExpertsError


def parse(*argv):
    return build_parser().parse_args(["serve", "--model", "preset:tiny-qwen3-moe", *argv])


def test_flags_and_defaults():
    a = parse()
    s = settings_from_args(a)
    assert (a.host, a.port) == ("127.0.0.1", 8080)
    assert (s.model_name, s.api_key, s.max_queue) == ("preset:tiny-qwen3-moe", None, 32)
    assert s.request_timeout == 600
    s = settings_from_args(parse("--served-model-name", "m", "--api-key", "k", "--max-queue", "0",
                                 "--request-timeout", "0", "--moe-hot-k", "2", "--allowed-origin", "http://a",
                                 "--allowed-origin", "http://b"))
    assert (s.model_name, s.api_key, s.max_queue, s.request_timeout) == ("m", "k", 0, None)
    assert s.allowed_origins == ("http://a", "http://b")
    s = settings_from_args(parse("--served-model-name", "a", "b", "-np", "1"))
    assert (s.model_name, s.aliases) == ("a", ("b",))
    assert settings_from_args(parse("-np", "4")).model_name == "preset:tiny-qwen3-moe"
    for bad in ("0", "17"):
        with pytest.raises(HotExpertsError, match="parallel must be an integer in 1..16"):
            settings_from_args(parse("-np", bad))
    for bad in (["--max-queue", "-1"], ["--request-timeout", "-2"], ["--port", "70000"]):
        with pytest.raises(HotExpertsError):
            settings_from_args(parse(*bad))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess():
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "hotexperts", "serve", "--model", "preset:tiny-qwen3-moe",
           "--dtype", "float32", "--device", "cpu", "--max-context", "128", "--port", str(port),
           "--served-model-name", "t", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, end = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "server did not come up"
            time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": "t", "prompt": "Hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    out = proc.stdout.read()
    assert rc in (0, 130), out
    line = next(x for x in out.splitlines() if x.startswith("hotexperts serve: model"))
    assert "'t'" in line and " on cpu;" in line and f"http://127.0.0.1:{port}/v1" in line, line
