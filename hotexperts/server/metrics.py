"""Prometheus metrics of one server (its own CollectorRegistry, so several apps can live in one process).

    m = Metrics(worker_info=lambda: (depth, busy), engine_stats=lambda: engine_stats_snapshot, device=dev)
    m.http(route, status)             # every response (ASGI middleware)
    m.finished(job, event, stats)     # worker thread, after each generation: tokens, TTFT, tok/s
    m.render() -> (bytes, content_type)

Series (all prefixed hotexperts_): http_requests_total{route,status}, prompt_tokens_total,
generation_tokens_total, time_to_first_token_seconds (histogram), request_duration_seconds (histogram),
generation_tokens_per_second (latest request's decode speed: the engine's last stats, or a batched
request's own, job.decode_tok_per_s), queue_depth, requests_running,
cache_{hits,misses,swaps,bytes_moved}_total and cache_layer_*_total{layer}, cache_hit_rate, cache_slots,
vram_{allocated,reserved}_bytes (0 on CPU). Cache values come from the engine's stats snapshot that the
worker thread takes after each request (the executor is never touched from another thread).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "hotexperts_"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CACHE_FIELDS = ("hits", "misses", "swaps", "bytes_moved")


class Metrics:
    def __init__(self, worker_info: Callable[[], tuple[int, bool]], engine_stats: Callable[[], dict | None],
                 device: torch.device | str = "cpu"):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(P + "http_requests", "HTTP responses by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "prompt tokens processed", registry=r)
        self.gen_tokens = Counter(P + "generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "arrival to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.duration = Histogram(P + "request_duration_seconds", "arrival to last token",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.tps = Gauge(P + "generation_tokens_per_second", "decode speed of the latest request", registry=r)
        Gauge(P + "queue_depth", "requests waiting", registry=r).set_function(lambda: worker_info()[0])
        Gauge(P + "requests_running", "requests generating (at most --parallel)", registry=r).set_function(
            lambda: float(worker_info()[1]))
        r.register(_EngineCollector(engine_stats, torch.device(device)))

    def http(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def finished(self, job, ev, stats: dict | None, now: float) -> None:
        if ev.kind != "end" or ev.finish_reason == "cancelled" and ev.completion_tokens == 0:
            return
        self.prompt_tokens.inc(ev.prompt_tokens)
        self.gen_tokens.inc(ev.completion_tokens)
        if job.first_token_s is not None:
            self.ttft.observe(job.first_token_s)
        self.duration.observe(now - job.arrived)
        if job.decode_tok_per_s is not None:             # a batched request (server/batch_worker.py)
            self.tps.set(job.decode_tok_per_s)
            return
        last = (stats or {}).get("last") or {}
        if last.get("decode_steps"):
            self.tps.set(last.get("gen_tok_per_s", 0.0))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Cache counters from the latest engine stats snapshot, VRAM read at scrape time."""

    def __init__(self, engine_stats: Callable[[], dict | None], device: torch.device):
        self.engine_stats, self.device = engine_stats, device

    def describe(self):
        return []

    def collect(self):
        yield from self._cache((self.engine_stats() or {}).get("cache"))
        yield from self._vram()

    def _cache(self, cache: dict | None):
        if not cache:
            return
        total, layers = cache.get("total", {}), cache.get("layers", {})
        for f in CACHE_FIELDS:
            yield CounterMetricFamily(P + f"cache_{f}", f"hot-expert cache {f}, all layers",
                                      value=total.get(f, 0))
            fam = CounterMetricFamily(P + f"cache_layer_{f}", f"hot-expert cache {f} per MoE layer",
                                      labels=["layer"])
            for layer, d in layers.items():
                fam.add_metric([str(layer)], d.get(f, 0))
            yield fam
        rate = total.get("hit_rate")
        yield GaugeMetricFamily(P + "cache_hit_rate", "hits / (hits + misses), all layers",
                                value=float("nan") if rate is None else rate)
        yield GaugeMetricFamily(P + "cache_slots", "GPU expert slots", value=cache.get("slots") or 0)

    def _vram(self):
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        alloc = torch.cuda.memory_allocated(self.device) if cuda else 0
        reserved = torch.cuda.memory_reserved(self.device) if cuda else 0
        yield GaugeMetricFamily(P + "vram_allocated_bytes", "CUDA memory allocated by torch", value=alloc)
        yield GaugeMetricFamily(P + "vram_reserved_bytes", "CUDA memory reserved by torch", value=reserved)
