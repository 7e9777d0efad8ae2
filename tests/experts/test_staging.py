"""StagingPools: run splitting and the copy-mode switch (the CUDA copies: tests/experts/test_hybrid)."""

from __future__ import annotations

import pytest
import torch

from hotexperts.config import KernelOptions
from hotexperts.errors import HotExpertsError
from hotexperts.experts.staging import StagingPools, _runs
from hotexperts.experts.store import ExpertStore
from hotexperts.weights import LayerExperts


def _pools(stage_copy: str = "auto") -> StagingPools:
    store = ExpertStore({0: LayerExperts(torch.randn(6, 8, 4), torch.randn(6, 4, 4))})
    return StagingPools(store, torch.device("cpu"), stage_copy)


def test_runs_of_consecutive_experts():
    assert _runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)]
    assert _runs([]) == []


def test_a_bad_copy_mode_is_a_clear_error():
    with pytest.raises(HotExpertsError, match="stage_copy must be one of auto, memcpy, gather"):
        KernelOptions(stage_copy="fast")


def test_memcpy_mode_and_an_unpinned_store_never_gather():
    assert not _pools("memcpy")._gather_ok(0, [(0, 1)] * 9)
    assert not _pools("gather")._gather_ok(0, [(0, 1)] * 9)      # a CPU store is never pinned
