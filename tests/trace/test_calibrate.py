"""`hotexperts calibrate`: the CPU call line (measured here), the graphed decode terms (CUDA code paths run
through a fake bench with known timings) and fitting on a bench JSON of the machine."""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

from hotexperts.bench.predict import shape_for  # noqa: E402
from hotexperts.cli.calibrate import add_parser  # noqa: E402
from hotexperts.trace import calibrate as cal  # noqa: E402
from hotexperts.trace import fit as F  # noqa: E402
from hotexperts.trace.costmodel import SHAPES, predict  # noqa: E402
from hotexperts.trace.profiles import BUILTIN, get_profile, save_hardware  # noqa: E402

QWEN = SHAPES["qwen3-30b-a3b"]
EXPERT = 2.949e6


class FakeDecodeBench:
    """CudaDecodeBench's interface with known timings: slot kernel 4 us + 5 us per expert, post + collect
    20 us, a miss adds the worker's 150 us and a 7 us handoff, the GPU reads one expert in 150 us."""
    expert_bytes = EXPERT

    def __init__(self):
        self.calls = []

    def slot_kernel(self, k):
        self.calls.append(("slot", k))
        return 4e-6 + 5e-6 * k

    def mailbox(self, miss):
        self.calls.append(("mailbox", miss))
        return (20e-6 + 157e-6, 150e-6) if miss else (20e-6, 0.0)

    def host_read(self, k):
        self.calls.append(("read", k))
        return 150e-6 + (k - 1) * 54e-6


RUN5_ENGINE = Path(__file__).resolve().parents[2] / "docs" / "results" / "h200-run5" / "engine.json"

def test_line_fit_and_call_terms():
    assert cal.line_fit({1: 3.0, 8: 10.0}) == pytest.approx((2.0, 1.0))
    assert cal.line_fit({1: 3.0, 2: 4.0, 8: 10.0}) == pytest.approx((2.0, 1.0))
    call, gbs = cal.call_terms({1: 180e-6, 8: 435e-6}, EXPERT)
    # slope (435 - 180) / 7 = 36.43 us per expert -> 2.949 MB / 36.43 us = 80.95 GB/s; intercept 143.6 us
    assert call == pytest.approx(143.57e-6, rel=1e-3) and gbs == pytest.approx(80.95, rel=1e-3)
    assert cal.call_terms({1: 10e-6, 8: 30e-6}, EXPERT)[0] == pytest.approx(10e-6 - 20e-6 / 7)
    assert cal.call_terms({1: 1e-6, 8: 80e-6}, EXPERT)[0] == 0.0          # a negative intercept is 0
    with pytest.raises(ValueError):
        cal.call_terms({1: 2e-6, 8: 1e-6}, EXPERT)
    with pytest.raises(ValueError):
        cal.line_fit({1: 1.0})


def test_decode_terms_from_a_fake_bench():
    b = FakeDecodeBench()
    d = cal.decode_terms(b, h2d_gbs=55.0)
    assert d["gpu_moe_launch_s"] == pytest.approx(4e-6)
    assert d["gpu_expert_gbs"]["int4"] == pytest.approx(EXPERT / 5e-6 / 1e9)
    assert d["post_s"] == pytest.approx(20e-6) and d["handoff_s"] == pytest.approx(7e-6)
    assert d["gpu_host_read_s"] == pytest.approx(150e-6 - EXPERT / 55e9)
    assert set(b.calls) == {("slot", 1), ("slot", 8), ("mailbox", False), ("mailbox", True), ("read", 1)}
    assert all(v.startswith("measured") for v in d["_sources"].values())


def test_cpu_call_times_runs_the_kernel():
    # (timings on a shared CI machine are not comparable: only the structure is checked here)
    times, per_expert = cal.cpu_call_times("int8", mib=8, sizes=(1, 8), gap_s=50e-6, repeats=2)
    assert set(times) == {1, 8} and min(times.values()) > 0
    assert per_expert == pytest.approx(3 * 2048 * 768 * (1 + 4 / 2048 / 2 + 4 / 768 / 2), rel=0.01)


def test_measure_writes_a_loadable_profile(tmp_path, monkeypatch):
    def fake_calls(fmt, mib, gap_s=0.0, **kw):                 # 1 expert 180 us, 8 experts 435 us
        assert gap_s == 300e-6
        return {1: 180e-6, 8: 435e-6}, EXPERT
    monkeypatch.setattr(cal, "cpu_call_times", fake_calls)
    hw = cal.measure("rtx3060-ddr4", mib=8, formats=("int4", "int8"), matmul=32, log=lambda *_: None,
                     decode_bench=FakeDecodeBench())
    assert hw.label == "calibrated" and hw.cpu_read_gbs > 0 and hw.cpu_tflops > 0
    assert hw.cpu_call_s == pytest.approx(143.57e-6, rel=1e-3) and "cpu_call_s" in hw.sources
    assert hw.cpu_expert_gbs["int4"] == pytest.approx(80.95, rel=1e-3) == hw.cpu_expert_gbs["int8"]
    # the decode kernel terms come from the (fake) graphed bench; unmeasured figures from the base
    assert hw.post_s == pytest.approx(20e-6) and hw.handoff_s == pytest.approx(7e-6)
    assert hw.gpu_expert_gbs["int4"] == pytest.approx(EXPERT / 5e-6 / 1e9)
    assert hw.gpu_expert_gbs["bf16"] == BUILTIN["rtx3060-ddr4"].gpu_expert_gbs["bf16"]
    assert hw.gpu_layer_s == BUILTIN["rtx3060-ddr4"].gpu_layer_s and "--bench" in hw.notes
    back = get_profile(str(save_hardware(tmp_path / "me.json", hw)))
    assert back == hw
    assert predict(QWEN, back, "cpu-moe").decode_tps > 0


class BrokenBench(FakeDecodeBench):
    def mailbox(self, miss):
        raise RuntimeError("no native worker")


def test_measure_keeps_base_figures_when_a_decode_kernel_fails():
    hw = cal.measure("h200", mib=4, formats=(), matmul=32, log=lambda *_: None, decode_bench=BrokenBench())
    assert hw.post_s == BUILTIN["h200"].post_s and "no native worker" in hw.notes
    assert hw.cpu_call_s == BUILTIN["h200"].cpu_call_s                       # no format measured


def _bench_json(tmp_path, hw):
    """A bench report of the current engine whose rows are the model's own speeds under `hw`."""
    shape = shape_for("qwen3-30b-a3b", "int4")
    lh = [0.9 + 0.002 * (i % 20) for i in range(48)]

    def res(label, placement, budget, hits=None):
        return dict(label=label, placement=placement, budget_gib=budget, layer_hit=hits, hit_rate=None,
                    swaps=0, decode_tokens=100, error=None, n_cpu_layers=None,
                    tests={"tg64": {"median": 1.0}})
    results = [res("gpu", "gpu", None), res("cpu-moe", "cpu", 16.0), res("n-cpu-moe", "layers:15", 16.0),
               res("n-cpu-moe", "layers:0", 24.0), res("hot", "hot:90", 16.0, lh),
               res("cache", "cache:4000slots", 16.0, lh[::-1])]
    rep = dict(model="qwen3_moe", preset="qwen3-30b-a3b", expert_quant="int4", tests=["tg64"], repeats=1,
               routing="synthetic", results=results)
    for r, c in zip(results, F.cases_from_report(rep, shape, engine=RUN5_ENGINE)[0], strict=True):
        p = F.predict_case(c, hw)
        r["tests"] = {"tg64": {"median": p.decode_tps}}
        r["cpu_ms_per_token"] = p.cpu_ms
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(rep))
    return path


def test_bench_fit_recovers_the_terms(tmp_path):
    true = replace(BUILTIN["h200"], gpu_layer_s=80e-6, post_s=25e-6, host_step_s=400e-6,
                   host_policy_s={"window-lfu": 500e-6, "auto": 1200e-6}, cpu_call_s=90e-6,
                   cpu_expert_gbs=dict(BUILTIN["h200"].cpu_expert_gbs) | {"int4": 60.0})
    path = _bench_json(tmp_path, true)
    got = cal.bench_fit(BUILTIN["h200"], [path], engine=RUN5_ENGINE, log=lambda *_: None)
    for key in ("gpu_layer_s", "post_s", "host_step_s", "cpu_call_s"):
        assert getattr(got, key) == pytest.approx(getattr(true, key), rel=1e-3), key
    assert got.host_policy_s == pytest.approx(true.host_policy_s, rel=1e-3)
    assert got.cpu_expert_gbs["int4"] == pytest.approx(60.0, rel=1e-3)
    assert got.sources["fit"]["free"] == ["gpu_layer_s", "post_s", "host_step_s", "host_policy_s:auto",
                                          "host_policy_s:window-lfu"]


def test_auto_fit_rows_only_fits_what_the_report_can_tell():
    shape = shape_for("qwen3-30b-a3b", "int4")
    rep = dict(results=[dict(label="gpu", placement="gpu", budget_gib=None, error=None,
                             tests={"tg8": {"median": 100.0}})], tests=["tg8"])
    cases = F.cases_from_report(rep, shape)[0]
    assert cal.auto_fit_rows(cases) == ([], [":gpu@-"], ["gpu_layer_s"])          # no CPU line from it


def test_cli_with_bench(tmp_path, monkeypatch):
    monkeypatch.setattr(cal, "measure", lambda *a, **k: BUILTIN["h200"])
    path = _bench_json(tmp_path, BUILTIN["h200"])
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "hw.json"
    args = parser.parse_args(["calibrate", "--out", str(out), "--bench", str(path),
                              "--engine", str(RUN5_ENGINE)])
    assert args.func(args) == 0
    got = get_profile(str(out))
    assert got.gpu_layer_s == pytest.approx(BUILTIN["h200"].gpu_layer_s, rel=1e-3)
    assert any(str(path) in v for v in got.sources.values() if isinstance(v, str))
