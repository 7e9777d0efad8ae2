"""Piecewise decode: graphs (here EagerCapture, which re-runs the captured function) around the executor's
per-layer host work give the same tokens and logits as the eager step, for hybrid and dense executors."""

import pytest
import torch
from tiny_models import decode_steps

from hotexperts.engine.presets import build_in_memory
from hotexperts.engine.runner.cuda_graph import EagerDecodeStep
from hotexperts.engine.runner.piecewise import EagerCapture, PiecewiseDecodeStep
from hotexperts.experts.build import build_executor
from hotexperts.experts.placement import Placement


@pytest.mark.parametrize("preset, placement", [("tiny-qwen3-moe", "hot:4"), ("tiny-qwen2-moe", "cpu"),
                                               ("tiny-mixtral", "gpu")])
def test_piecewise_step_matches_eager(preset, placement):
    lm = build_in_memory(preset, dtype="float32", device="cpu")
    runs = []
    for make in (lambda m, kv, ex: EagerDecodeStep(m, kv, ex, torch.device("cpu")),
                 lambda m, kv, ex: PiecewiseDecodeStep(m, kv, ex, "cpu", capture=EagerCapture)):
        ex = build_executor(Placement.parse(placement), lm.store, lm.cfg, "cpu")
        kv = lm.model.new_kv_cache(32)
        with torch.no_grad():
            lm.model(torch.tensor([5, 6, 7]), torch.arange(3), kv, ex)        # prefill positions 0..2
            ex.end_step()
        step = make(lm.model, kv, ex)
        runs.append(decode_steps(step, ex, 9, 8))
    assert step.stages is not None and not step.failed                      # really ran the pieces
    assert len(step.stages) == lm.cfg.num_layers + 2
    (ta, ra), (tb, rb) = runs
    assert ta == tb
    for a, b in zip(ra, rb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
