"""StagingPools: run splitting and the copy-mode switch (the CUDA copies: tests/experts/test_hybrid)."""

from __future__ import annotations

import pytest
import torch

from hotexperts.errors import HotExpertsError
from hotexperts.experts.staging import StagingPools, _runs
from hotexperts.experts.store import ExpertStore
from hotexperts.experts.weights import LayerExperts


def _pools() -> StagingPools:
    store = ExpertStore({0: LayerExperts(torch.randn(6, 8, 4), torch.randn(6, 4, 4))})
    return StagingPools(store, torch.device("cpu"))


def test_runs_of_consecutive_experts():
    assert _runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)]
    assert _runs([]) == []


def test_a_bad_copy_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HOTEXPERTS_STAGE_COPY", "fast")
    with pytest.raises(HotExpertsError, match="HOTEXPERTS_STAGE_COPY must be one of auto, memcpy, gather"):
        _pools()._gather_ok(0, [(0, 1)] * 9)


def test_memcpy_mode_and_an_unpinned_store_never_gather(monkeypatch):
    pools = _pools()
    monkeypatch.setenv("HOTEXPERTS_STAGE_COPY", "memcpy")
    assert not pools._gather_ok(0, [(0, 1)] * 9)
    monkeypatch.setenv("HOTEXPERTS_STAGE_COPY", "gather")
    assert not pools._gather_ok(0, [(0, 1)] * 9)           # a CPU store is never pinned
