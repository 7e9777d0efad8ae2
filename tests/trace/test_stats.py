"""Locality statistics on hand-made sequences with known answers, and on the real traces."""

import numpy as np
import pytest

from hotexperts.trace import stats
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.import_shared import ENV_VAR, find_shared_traces, load_shared


def seq(tokens, e=4, request=None):
    """One MoE layer; tokens = list of expert lists (one per token)."""
    ids = np.array(tokens)[:, None, :]                                     # [N, 1, K]
    n, _, k = ids.shape
    req = np.zeros(n) if request is None else np.array(request)
    meta = dict(model="t", num_experts=e, top_k=k, moe_layers=[0], source="test")
    return RoutingTrace(ids, np.ones(ids.shape), np.zeros(n, bool), req, meta)


T = seq([[0], [1], [0], [0], [2], [1]])


def test_reuse_and_repeat():
    np.testing.assert_array_equal(stats.reuse_distances(T)[0], [2, 1, 4])
    assert stats.reuse_distance_median(T)[0] == 2
    assert stats.repeat_share(T)[0] == pytest.approx(1 / 5)


def test_request_boundary_resets_reuse():
    t = seq([[0], [0], [0], [0]], request=[0, 0, 1, 1])
    np.testing.assert_array_equal(stats.reuse_distances(t)[0], [1, 1])
    assert stats.repeat_share(t)[0] == 1.0


def test_lru_known_answers():
    assert stats.lru_hit_rate(T, 0.5)[0] == pytest.approx(2 / 6)
    assert stats.lru_hit_rate(T, 0.25)[0] == pytest.approx(1 / 6)
    assert stats.lru_hit_rate(T, 1.0)[0] == pytest.approx(3 / 6)            # compulsory misses only


def test_lru_lookups_before_updates():
    t = seq([[0, 1], [2, 0], [1, 3]], e=8)
    assert stats.lru_hit_rate(t, 0.25)[0] == pytest.approx(1 / 6)           # cap 2: only 0 at token 1


def test_lru_skips_missing_cells():
    t = seq([[0], [-1], [0]])
    assert stats.lru_hit_rate(t, 0.25)[0] == pytest.approx(1 / 2)


def test_popularity_and_static():
    assert stats.distinct_experts(T)[0] == 3
    assert stats.top_share(T, 0.25)[0] == pytest.approx(3 / 6)
    assert stats.static_coverage(T, 1)[0] == pytest.approx(1 / 3)


def test_uniform_baselines():
    rng = np.random.default_rng(0)
    t = seq([rng.choice(64, 4, replace=False) for _ in range(3000)], e=64)
    s = stats.summarize(t, fractions=(0.25,))
    assert s["repeat"] == pytest.approx(4 / 64, abs=0.01)
    assert s["lru@0.25"] == pytest.approx(0.25, abs=0.02)
    assert s["top10_share"] == pytest.approx(7 / 64, abs=0.02)
    assert "| model |" in stats.format_table([s])


@pytest.mark.skipif(find_shared_traces() is None, reason=f"../shared/traces absent (set ${ENV_VAR})")
@pytest.mark.parametrize("name,repeat,lru25,lru50", [
    ("qwen3-30b-a3b", 0.38, 0.80, 0.91), ("gemma-4-26b-a4b", 0.36, 0.77, 0.91),
    ("gpt-oss-120b", 0.18, 0.71, 0.72)])
def test_real_traces_match_published_table(name, repeat, lru25, lru50):
    """shared/traces/README.md's locality table (measured independently) is reproduced."""
    s = stats.summarize(load_shared(name))
    assert s["repeat"] == pytest.approx(repeat, abs=0.01)
    assert s["lru@0.25"] == pytest.approx(lru25, abs=0.01)
    assert s["lru@0.5"] == pytest.approx(lru50, abs=0.01)
