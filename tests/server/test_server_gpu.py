"""GPU smoke test of the server: a CUDA engine with a hot-expert cache driven from the worker thread
(CUDA graphs captured there), streaming == non-streaming, VRAM and cache metrics. Skips without CUDA."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from live_server import MODEL, serve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.mark.parametrize("placement", ["gpu", "hot:4"])
def test_cuda_server(placement):
    from hotexperts.engine.engine import Engine
    from hotexperts.experts.placement import Placement

    eng = Engine.load("preset:tiny-qwen3-moe", dtype="bfloat16", device="cuda",
                      placement=Placement.parse(placement), max_context=256)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 24,
            "temperature": 0}
    with serve(eng) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        full = c.post("/v1/chat/completions", json=body).json()
        parts = []
        with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    parts += [ch["delta"].get("content") or "" for ch in chunk["choices"]]
        assert full["choices"][0]["message"]["content"] == "".join(parts)
        assert full["usage"]["completion_tokens"] <= 24
        m = _metrics(s.url)
    assert m["hotexperts_vram_allocated_bytes"] > 0
    if placement != "gpu":
        assert m["hotexperts_cache_hits_total"] + m["hotexperts_cache_misses_total"] > 0
