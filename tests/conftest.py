"""Fixtures shared by the whole suite (none autouse: a module asks for what it needs).

    one_thread (module scope): torch.set_num_threads(1) for the module, restored after it. Tiny matmuls run
    faster on one thread on shared CI cores (no oversubscription). Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")` or from a directory's autouse fixture.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the requesting module (tiny matmuls: ~10x faster on shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
