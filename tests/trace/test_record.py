"""RouteRecorder buffer logic (standalone), the trace CLI, and live recording when the engine exists."""

import argparse
import importlib

import numpy as np
import pytest
import torch

from hotexperts.cli.trace import add_parser, run
from hotexperts.errors import HotExpertsError
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.record import RouteRecorder, read_prompts, record

LAYERS = [1, 3]          # decoder-layer indices of the MoE layers (layer 0 and 2 dense)


def forward(rec, t, base):
    """Simulate one forward pass of T tokens: on_route for every MoE layer in order."""
    for i, layer in enumerate(LAYERS):
        ids = torch.arange(t * 2).reshape(t, 2) % 8 + 0 * base
        ids = (ids + base + i) % 8
        w = torch.full((t, 2), 0.5, dtype=torch.bfloat16)
        rec(layer, ids, w)


def test_prefill_then_decode_two_requests():
    rec = RouteRecorder(LAYERS, top_k=2, capacity=2)                        # forces growth
    for r in range(2):
        rec.begin_request()
        forward(rec, 3, r)                                                  # prefill, T=3
        rec.mark_prompt(False)
        for s in range(2):
            forward(rec, 1, 10 + s)                                         # decode, T=1
    t = rec.to_trace({"num_experts": 8, "model": "tiny"})
    assert t.ids.shape == (10, 2, 2) and rec.num_tokens == 10
    np.testing.assert_array_equal(t.is_prompt, [1, 1, 1, 0, 0] * 2)
    np.testing.assert_array_equal(t.request, [0] * 5 + [1] * 5)
    np.testing.assert_array_equal(t.step, [0, 0, 0, 1, 2, 3, 3, 3, 4, 5])
    np.testing.assert_array_equal(t.iterations(), t.step)
    np.testing.assert_array_equal(t.ids[0], [[0, 1], [1, 2]])
    np.testing.assert_array_equal(t.ids[3], [[2, 3], [3, 4]])                # base 10: (0+10)%8, ...
    assert (t.weights == np.float16(0.5)).all()
    assert t.meta["moe_layers"] == LAYERS and t.meta["source"] == "recorded"


def test_numpy_inputs_and_missing_layer():
    rec = RouteRecorder(LAYERS, top_k=2)
    rec(1, np.array([[5, 6]]), np.array([[0.7, 0.3]]))
    rec(1, np.array([[2, 4]]), np.array([[0.6, 0.4]]))                     # layer 3 skipped: new forward
    t = rec.to_trace({"num_experts": 8})
    np.testing.assert_array_equal(t.ids[:, 1], [[-1, -1], [-1, -1]])
    assert np.isnan(t.weights[:, 1].astype(np.float32)).all()
    np.testing.assert_array_equal(t.step, [0, 1])


def test_errors():
    rec = RouteRecorder(LAYERS, top_k=2)
    with pytest.raises(HotExpertsError, match="not a MoE layer"):
        rec(0, np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(HotExpertsError, match="expects 2"):
        rec(1, np.zeros((1, 3)), np.zeros((1, 3)))


class FakeEngine:
    """Engine contract stand-in: generate() runs one prefill forward, then one forward per next token."""
    class config:                                                           # noqa: N801
        moe_layers, top_k, num_experts, model_type = LAYERS, 2, 8, "fake"

    def __init__(self):
        self.executor = type("Ex", (), {"on_route": None})()

    def generate(self, ids, params):
        forward(self.executor.on_route, len(ids), 0)
        for i in range(params):
            yield i
            if i + 1 < params:
                forward(self.executor.on_route, 1, i)


def test_record_with_engine_contract():
    eng = FakeEngine()
    t = record(eng, [[1, 2, 3, 4], [5, 6]], 3)
    np.testing.assert_array_equal(t.is_prompt, [1, 1, 1, 1, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(t.request, [0] * 6 + [1] * 4)
    assert eng.executor.on_route is None and t.meta["model"] == "fake"


def parse(argv):
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="cmd"))
    return p.parse_args(["trace", *argv])


def test_cli_synthetic_and_stats(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert run(parse(["--synthetic", "mixtral-8x7b", "--tokens", "64", "--out", str(out), "--stats"])) == 0
    t = RoutingTrace.load(out)
    assert t.ids.shape == (64, 32, 2)
    assert "lru@0.25" in capsys.readouterr().out


def test_cli_import_tiny_csv(tmp_path):
    (tmp_path / "qwen.route.csv").write_text(
        "# route_trace v1\n# model=/x/q.gguf arch=qwen3moe n_layer=1 n_expert=8 n_expert_used=2\n"
        "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n"
        "0,1,0,0,0,3,0.6,0,1\n0,1,0,0,1,4,0.4,0,1\n")
    assert run(parse(["--import", str(tmp_path / "qwen.route.csv"), "--out", str(tmp_path / "q.npz")])) == 0
    assert RoutingTrace.load(tmp_path / "q.npz").meta["model"] == "Qwen3-30B-A3B"


def test_cli_needs_prompts_and_output():
    with pytest.raises(HotExpertsError, match="--prompts"):
        run(parse(["--model", "preset:x", "--out", "x.npz"]))
    with pytest.raises(HotExpertsError, match="nothing to do"):
        run(parse(["--synthetic", "flat-512"]))


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("hello\n\nworld\n")
    assert read_prompts(tmp_path / "p.txt", chat=False) == ["hello", "world"]
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, '
                                      '{"role": "assistant", "content": "b"}]}\n')
    assert read_prompts(tmp_path / "c.jsonl", chat=True) == [[{"role": "user", "content": "a"}]]
    (tmp_path / "bad.jsonl").write_text("[]\n")
    with pytest.raises(HotExpertsError, match="user turn"):
        read_prompts(tmp_path / "bad.jsonl", chat=True)


def _tiny_preset():
    try:
        importlib.import_module("hotexperts.engine.engine")
        presets = importlib.import_module("hotexperts.engine.presets")
    except Exception as e:                                                  # noqa: BLE001
        pytest.skip(f"hotexperts.engine.engine not importable yet: {e}")
    names = [n for n in getattr(presets, "PRESETS", {}) if n.startswith("tiny")]
    if not names:
        pytest.skip("no tiny-* preset in hotexperts.engine.presets.PRESETS")
    return names[0]


def test_live_recording_end_to_end(tmp_path):
    name = _tiny_preset()
    (tmp_path / "p.txt").write_text("hello there\nwhat is two plus two\n")
    out = tmp_path / "live.npz"
    args = parse(["--model", f"preset:{name}", "--prompts", str(tmp_path / "p.txt"), "--raw",
                  "--max-tokens", "4", "--dtype", "float32", "--out", str(out)])
    assert run(args) == 0
    t = RoutingTrace.load(out)
    assert set(t.request.tolist()) == {0, 1}
    assert (~t.is_prompt).sum() >= 2 and (t.ids[:, :, 0] >= 0).all()
    assert t.missing_fraction() == 0.0
