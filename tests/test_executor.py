"""The executor seam (hotexperts/executor.py): every attribute a caller may read is declared on the base class
with a default, every executor answers it, the plan comes in through the constructor, and no caller probes an
executor with getattr / hasattr."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hotexperts.bench.replay import RoutingReplay
from hotexperts.errors import HotExpertsError
from hotexperts.executor import ExpertExecutor
from hotexperts.experts.build import build_executor
from hotexperts.experts.placement import Placement
from hotexperts.experts.reference import DenseExecutor
from hotexperts.experts.store import ExpertStore
from hotexperts.trace.format import RoutingTrace
from hotexperts.weights import LayerExperts

ROOT = Path(__file__).resolve().parents[1]
DECLARED = ("plan", "slots", "planner", "prefetch", "cache_stats", "on_route", "graph_safe",
            "verify_graph_safe")
# getattr(executor, ...), hasattr(engine.executor, ...), getattr(ex, ...), getattr(self.inner, ...)
PROBE = re.compile(r"\b(?:getattr|hasattr)\(\s*[\w.]*\b(?:executor|ex|inner)\s*,")
E, D, I, LAYERS = 4, 8, 16, (0, 1)


def store() -> ExpertStore:
    g = torch.Generator().manual_seed(0)
    return ExpertStore({l: LayerExperts(torch.randn(E, 2 * I, D, generator=g),
                                        torch.randn(E, D, I, generator=g)) for l in LAYERS})


class _Cfg:
    top_k, hidden_size = 2, D


def test_the_base_class_declares_every_attribute_with_a_default_and_its_hooks_are_no_ops():
    ex = ExpertExecutor()
    assert all(getattr(ex, name) in (None, False) for name in DECLARED)
    for hook in (ex.end_step, ex.before_step, ex.flush, ex.check_errors, ex.close, ex.wait_for_fills):
        assert hook() is None
    assert ex.stats() is None and ex.set_gpu_timing(True) is None
    with pytest.raises(HotExpertsError, match="needs an expert cache"):
        ex.export_profile("p.json")


def test_the_dense_executor_gets_its_plan_from_the_constructor():
    layers = {l: store().layer(l) for l in LAYERS}
    assert DenseExecutor(layers).plan is None
    marker = object()
    assert DenseExecutor(layers, plan=marker).plan is marker
    built = build_executor(Placement.parse("gpu"), store(), _Cfg, "cpu")
    assert isinstance(built, DenseExecutor) and built.plan is not None and built.plan.dense


@pytest.mark.parametrize("text", ["gpu", "cpu", "hot:2"])
def test_every_built_executor_and_the_replay_answer_the_declared_attributes(text):
    ex = build_executor(Placement.parse(text), store(), _Cfg, "cpu")
    ids = np.zeros((3, len(LAYERS), 2), np.int16)
    meta = dict(model="toy", num_experts=E, top_k=2, moe_layers=list(LAYERS), source="test")
    trace = RoutingTrace(ids, np.ones(ids.shape, np.float16), np.zeros(3, bool), np.zeros(3, np.int32), meta)
    replay = RoutingReplay(ex, trace, LAYERS, "cpu")
    for name in DECLARED:
        assert getattr(replay, name) is getattr(ex, name), name          # the wrapper forwards each
    assert ex.plan is not None and (ex.slots is None) == (text != "hot:2")
    assert (ex.planner is None) == (text != "hot:2") and ex.prefetch is None
    ex.close()


def test_no_caller_probes_an_executor_for_attributes():
    hits = []
    for folder in ("hotexperts", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if PROBE.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "read the executor's declared attributes directly (hotexperts/executor.py):\n" + \
        "\n".join(hits)
    assert PROBE.search('plan = getattr(engine.executor, "plan", None)')         # the scan can fail
