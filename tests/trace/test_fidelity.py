"""scripts/fidelity.py on a hand-made bench JSON: placements mapped to the cost model, errors and flags."""

import importlib.util
import json
from pathlib import Path

import pytest

from hotexperts.bench.predict import real_plan, shape_for
from hotexperts.errors import HotExpertsError
from hotexperts.trace import fit as F
from hotexperts.trace.costmodel import predict
from hotexperts.trace.profiles import get_profile

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fidelity.py"
RUNS = Path(__file__).resolve().parents[2] / "docs" / "results"
ENGINE = {tag: RUNS / f"h200-{tag}" / "engine.json" for tag in ("run4", "run5", "run7")}   # older engines


@pytest.fixture(scope="module")

def fid():
    spec = importlib.util.spec_from_file_location("fidelity_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _res(label, placement, budget, tg, **kw):
    base = dict(label=label, placement=placement, budget_gib=budget, peak_vram_gib=None, hit_rate=None,
                layer_hit=None, swaps=0, bytes_moved=0, error=None,
                tests={"pp512": {"median": 900.0}, "tg128": {"median": tg, "min": tg, "max": tg}})
    return base | kw


def _report(results, **kw):
    return dict(model="qwen3_moe", routing="synthetic:qwen3-30b-a3b", tests=["pp512", "tg128"], repeats=3,
                expert_quant="int8", command="hotexperts bench --model preset:qwen3-30b-a3b --json x.json",
                results=results) | kw


def _hw_shape():
    return get_profile("h200"), shape_for("qwen3-30b-a3b", "int8")


def test_rows_match_cost_model(fid):
    hw, shape = _hw_shape()
    gpu_pred = predict(shape, hw, "gpu").decode_tps
    layer_hit = [0.5] * 24 + [0.9] * 24
    n24 = predict(shape, hw, "n-cpu-moe:24").decode_tps
    hot = predict(shape, hw, "hot:19", layer_hit=layer_hit, swaps_per_token=4.0).decode_tps
    rep = _report([
        _res("gpu", "gpu", None, gpu_pred),                               # exact: error 0
        _res("cpu-moe", "cpu", 16.0, 2 * predict(shape, hw, "cpu-moe").decode_tps),   # -50%
        _res("n-cpu-moe", "layers:24", 16.0, n24 / 0.9),                  # -10%: within
        _res("hot", "hot:19", 16.0, hot / 1.3, layer_hit=layer_hit, hit_rate=0.7, swaps=4 * 388),  # +30%
        _res("cache", "cache:8GiB", 16.0, 0.0, error="RuntimeError: boom"),
    ])
    rs = fid.rows(rep, hw, shape)
    assert fid.decode_steps(rep) == 4 + 128 * 3
    by = {r["label"]: r for r in rs}
    assert by["gpu"]["error_pct"] == pytest.approx(0.0, abs=1e-9) and not by["gpu"]["flag"]
    assert by["cpu-moe"]["error_pct"] == pytest.approx(-50.0) and by["cpu-moe"]["flag"]
    assert by["cpu-moe"]["cost_placement"] == "cpu-moe"
    assert by["n-cpu-moe"]["error_pct"] == pytest.approx(-10.0) and not by["n-cpu-moe"]["flag"]
    assert by["hot"]["predicted"] == pytest.approx(hot)                 # swaps / (4 + 128 x 3) steps
    assert by["hot"]["error_pct"] == pytest.approx(30.0) and by["hot"]["flag"]
    assert by["hot"]["dominant"] in by["hot"]["terms_ms"]
    assert "boom" in by["cache"]["skipped"]
    text = fid.table(rs)
    assert "**>15%**" in text and "skipped: RuntimeError: boom" in text
    assert "2 of 4 placements within ±15%" in text


def test_layers_auto_n(fid):
    hw, shape = _hw_shape()
    rep = _report([_res("n-cpu-moe", "layers:auto", 16.0, 80.0),
                   _res("n-cpu-moe", "layers:auto", 24.0, 90.0, n_cpu_layers=7)])
    rs = fid.rows(rep, hw, shape, nmap=fid.parse_n_map("16=30"))
    assert [r["cost_placement"] for r in rs] == ["n-cpu-moe:30", "n-cpu-moe:7"]
    rs = fid.rows(rep, hw, shape)                                        # no mapping: estimated for 16 GiB
    assert rs[0]["cost_placement"] == f"n-cpu-moe:{real_plan(shape, 16.0)['n_cpu_moe']}"
    assert rs[0]["note"] == "N est."
    with pytest.raises(HotExpertsError):
        fid.parse_n_map("16=x")


def test_shape_and_format(fid):
    shape, name = fid.resolve_shape(_report([]))
    assert name == "qwen3-30b-a3b" and shape.cpu_format == "int8"
    shape, _ = fid.resolve_shape(_report([], preset="preset:mixtral-8x7b-mini"), fmt="bf16")
    assert shape.name == "mixtral-8x7b" and shape.cpu_format == "bf16"
    rep = _report([_res("cache", "cache:10slots", 1.0, 5.0, layer_hit=[0.5] * 4)],
                  preset="qwen3-30b-a3b-mini")
    assert len(fid.warnings(rep, shape_for("qwen3-30b-a3b", "none"), "qwen3-30b-a3b-mini")) == 2
    with pytest.raises(HotExpertsError, match="--shape"):
        fid.resolve_shape(_report([], command="", model="llama"))


def test_cli(fid, tmp_path, capsys):
    hw, shape = _hw_shape()
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_report([_res("gpu", "gpu", None, 100.0)])))
    out_json = tmp_path / "rows.json"
    assert fid.main([str(path), "--profile", "h200", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| gpu (gpu) [gpu] | - | 100.0 |" in out
    assert json.loads(out_json.read_text())[0]["measured"] == 100.0
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert fid.main([str(bad)]) == 2


# ---- engines, top-k, fitting ------------------------------------------------------------------------
def test_engine_options_and_trace_top_k(fid):
    hw, shape = _hw_shape()
    rep = _report([_res("hot", "hot:19", 16.0, 50.0, layer_hit=[0.9] * 48, hit_rate=0.9),
                   _res("cache+z2", "cache:8GiB", 16.0, 50.0, layer_hit=[0.9] * 48, hit_rate=0.9),
                   _res("n-cpu-moe", "layers:24", 16.0, 50.0)],
                  routing="replayed trace x.csv (Qwen3-30B-A3B, top-6, 156 tokens)")
    cases = {c.label: c for c in F.cases_from_report(rep, shape, engine=ENGINE["run5"], tag="t")[0]}
    assert cases["hot"].kw["gpu_misses"] == 1 and cases["hot"].kw["gpu_share"] == 1   # run 5: auto 1, first
    assert cases["cache+z2"].kw["gpu_misses"] == 2 and not cases["hot"].kw["deferred_host"]
    assert cases["n-cpu-moe"].kw["gpu_misses"] == 0 and cases["hot"].shape.top_k == 6
    assert cases["hot"].id == "t:hot@16"
    cur = {c.label: c for c in F.cases_from_report(rep, shape, engine="current")[0]}
    assert "gpu_misses" not in cur["hot"].kw and cur["hot"].kw["deferred_host"]          # the model's auto
    run4 = {c.label: c for c in F.cases_from_report(rep, shape, engine=ENGINE["run4"])[0]}
    assert run4["hot"].kw["gpu_misses"] == 0
    with pytest.raises(HotExpertsError, match="engine"):
        F.cases_from_report(rep, shape, engine="run9")
    assert fid.default_tag("docs/results/h200-run5/bench_qwen3-30b-a3b_synthetic.json") == "run5"
    assert fid.default_tag("x/h200-run4/bench_qwen3-30b-a3b_trace_extra0.json") == "run4-trace"
    assert fid.default_tag("x/mine.json") == "mine"


def _synthetic_bench(tmp_path, hw, shape, engine=ENGINE["run5"]):
    """A bench JSON whose speeds and CPU times are the model's own under `hw` (what a perfect fit finds)."""
    layer_hit = [0.9 + 0.002 * (i % 20) for i in range(48)]
    spec = [("gpu", "gpu", None, {}), ("cpu-moe", "cpu", 16.0, {}), ("n-cpu-moe", "layers:15", 16.0, {}),
            ("n-cpu-moe", "layers:0", 24.0, {}), ("hot", "hot:90", 16.0, dict(layer_hit=layer_hit)),
            ("hot", "hot:128", 24.0, dict(layer_hit=[1.0] * 48)),
            ("cache+z0", "cache:4000slots", 16.0, dict(layer_hit=layer_hit[::-1])),
            ("cache", "cache:6000slots", 24.0, dict(layer_hit=[1.0] * 48)),
            ("cache+z2", "cache:4000slots", 16.0, dict(layer_hit=layer_hit))]
    results = []
    for label, placement, budget, extra in spec:
        r = _res(label, placement, budget, 1.0, decode_tokens=192, swaps=192 * 3 if extra else 0,
                 hit_rate=0.9 if extra else None, **extra)
        results.append(r)
    rep = _report(results, expert_quant="int4")
    for r, c in zip(rep["results"], F.cases_from_report(rep, shape, engine=engine)[0], strict=True):
        p = F.predict_case(c, hw)
        r["tests"]["tg128"] = {"median": p.decode_tps}
        r["cpu_ms_per_token"] = p.cpu_ms
    path = tmp_path / "h200-run5" / "bench_synthetic.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rep))
    (path.parent / "engine.json").write_text(Path(engine).read_text())    # the run's engine, beside it
    return path


def test_fit_recovers_known_terms(fid, tmp_path, capsys):
    from dataclasses import replace

    shape = shape_for("qwen3-30b-a3b", "int4")
    true = replace(get_profile("h200"), gpu_layer_s=90e-6, post_s=15e-6, host_step_s=500e-6,
                   host_policy_s={"window-lfu": 300e-6, "auto": 900e-6}, cpu_call_s=100e-6,
                   cpu_expert_gbs={"int4": 70.0})
    path = _synthetic_bench(tmp_path, true, shape)
    cpu = "run5:cpu-moe@16,run5:hot@16,run5:cache+z0@16"
    time = "run5:gpu@-,run5:cpu-moe@16,run5:n-cpu-moe@24,run5:hot@24,run5:cache@24,run5:hot@16"
    out = tmp_path / "fitted.json"
    assert fid.main([str(path), "--fit", "--fit-cpu", cpu, "--fit-time", time, "--save-profile", str(out),
                     "--json", str(tmp_path / "rows.json")]) == 0
    text = capsys.readouterr().out
    got = get_profile(str(out))
    assert got.label == "fitted" and got.sources["fit"]["cpu_rows"] == cpu.split(",")
    for key in ("gpu_layer_s", "post_s", "host_step_s", "cpu_call_s"):
        assert getattr(got, key) == pytest.approx(getattr(true, key), rel=1e-3), key
    assert got.host_policy_s["auto"] == pytest.approx(900e-6, rel=1e-3)
    assert got.cpu_expert_gbs["int4"] == pytest.approx(70.0, rel=1e-3)
    rows = {r["id"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert rows["run5:gpu@-"]["fit"] == "time" and rows["run5:cache+z0@16"]["fit"] == "cpu"
    assert rows["run5:cpu-moe@16"]["fit"] == "time+cpu" and rows["run5:cache+z2@16"]["fit"] == "held out"
    assert all(abs(r["error_pct"]) < 0.1 for r in rows.values())                 # a perfect model
    assert "Held out (not used by the fit): 2 of 2 within ±15%" in text
    with pytest.raises(HotExpertsError, match="not in the reports"):
        rows = F.cases_from_report(json.loads(path.read_text()), shape, engine=ENGINE["run5"], tag="run5")[0]
        F.fit_decode(rows, true, cpu_rows=["run5:nope@1"], time_rows=[])


def test_fit_time_clamps_negative_terms():
    from dataclasses import replace

    shape = shape_for("qwen3-30b-a3b", "int4")
    hw = get_profile("h200")
    rep = _report([_res("gpu", "gpu", None, 1.0), _res("cpu-moe", "cpu", 16.0, 1.0)], expert_quant="int4")
    cases = F.cases_from_report(rep, shape, engine=ENGINE["run5"], tag="x")[0]
    gpu_t = 1 / F.predict_case(cases[0], hw).decode_tps
    cases[0].measured_tps = 1 / gpu_t
    cases[1].measured_tps = F.predict_case(cases[1], replace(hw, post_s=0.0)).decode_tps * 1.05  # faster
    got = F.fit_time(cases, hw, ["x:gpu@-", "x:cpu-moe@16"], ["gpu_layer_s", "post_s"])
    # post_s fitted below 0 -> fixed at 0; gpu_layer_s refitted on both rows (between the two rows' needs)
    assert got.post_s == 0.0 and 0.9 * hw.gpu_layer_s < got.gpu_layer_s < hw.gpu_layer_s




def test_builtin_h200_is_the_fit_of_run_7(fid):
    """The built-in h200 profile's refitted terms are what `fidelity.py --fit` gets from run 7's JSON
    (starting from the run-5 fit), and every run-7 Qwen3 placement is within 15% (docs/simulator.md)."""
    hw = get_profile("h200")
    rep = fid.load_report(RUNS / "h200-run7" / "bench_qwen3-30b-a3b_synthetic.json")
    shape, _ = fid.resolve_shape(rep)
    cases = F.cases_from_report(rep, shape, engine=ENGINE["run7"], tag="run7")[0]
    fit = hw.sources["fit"]
    _, info = fid.fit_rows(cases, get_profile("h200-run5"), fit["cpu_rows"], fit["time_rows"],
                           free=("gpu_layer_s", "post_s"))
    for key, value in info["values"].items():
        assert value == pytest.approx(F.get_param(hw, key), rel=2e-3), key
    rows = [fid.case_row(c, hw, 15.0, fid.fit_roles(hw)) for c in cases]
    assert len(rows) == 9 and all(not r["flag"] for r in rows)


def test_run5_profile_is_the_fit_of_runs_4_and_5(fid):
    """The run-5 profile's fitted terms are what `fidelity.py --fit` gets from the committed JSONs, and
    every run-5 placement is within 15% (docs/simulator.md)."""
    hw = get_profile("h200-run5")
    cases = []
    for name, tag in (("h200-run5", "run5"), ("h200-run4", "run4")):
        rep = fid.load_report(RUNS / name / "bench_qwen3-30b-a3b_synthetic.json")
        shape, _ = fid.resolve_shape(rep)
        cases += F.cases_from_report(rep, shape, engine=ENGINE[tag], tag=tag)[0]
    fitted, info = fid.fit_rows(cases, hw, fid.FIT_H200["cpu"], fid.FIT_H200["time"])
    for key, value in info["values"].items():
        assert value == pytest.approx(F.get_param(hw, key), rel=2e-3), key
    assert hw.sources["fit"]["time_rows"] == fid.FIT_H200["time"]
    rows = [fid.case_row(c, hw, 15.0, fid.fit_roles(hw)) for c in cases if c.id.startswith("run5:")]
    assert len(rows) == 8 and all(not r["flag"] for r in rows)


def test_fit_module_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, hotexperts.trace.fit, hotexperts.bench.predict; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
