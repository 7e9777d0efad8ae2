"""A random routing trace shaped to a model, replayed by the bench tests (bench/concurrency, bench/verify).

    random_trace_source(cfg, n, seed=0) -> (ids [n, moe layers, top_k] int16, RoutingSource("trace", ...))
"""

import numpy as np

from hotexperts.bench.workload import RoutingSource
from hotexperts.trace.format import RoutingTrace


def random_trace_source(cfg, n: int, seed: int = 0) -> tuple[np.ndarray, RoutingSource]:
    """n decode tokens (none a prompt token) routed to uniform random experts, weights 1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.num_experts, (n, len(cfg.moe_layers), cfg.top_k)).astype(np.int16)
    meta = {"model": "t", "num_experts": cfg.num_experts, "top_k": cfg.top_k,
            "moe_layers": list(cfg.moe_layers), "source": "test"}
    trace = RoutingTrace(ids, np.ones(ids.shape, np.float16), np.zeros(n, bool), np.zeros(n, np.int32), meta)
    return ids, RoutingSource("trace", "test", trace)
