"""scripts/fidelity.py on a hand-made bench JSON: placements mapped to the cost model, errors and flags."""

import importlib.util
import json
from pathlib import Path

import pytest

from hotexperts.bench.predict import real_plan, shape_for
from hotexperts.errors import HotExpertsError
from hotexperts.trace.costmodel import predict
from hotexperts.trace.profiles import get_profile

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fidelity.py"


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
