"""scripts/stock/compare.py: llama-bench rows and `hotexperts bench` reports merged into one table."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "stock" / "compare.py"
NO_RC124 = " | ".join(["no result (rc 124)"] * 4)


@pytest.fixture(scope="module")
def cmp():
    spec = importlib.util.spec_from_file_location("compare_stock_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _llama_rows(ncmoe, pp, tg):
    base = dict(build_commit="abc1234", build_number=1, gpu_info="NVIDIA H100 80GB HBM3", n_cpu_moe=ncmoe,
                n_threads=16, n_ubatch=512, flash_attn=True, load_mode="none", model_type="qwen3moe Q4_K")
    return [base | dict(n_prompt=512, n_gen=0, avg_ts=pp, stddev_ts=pp / 100),
            base | dict(n_prompt=0, n_gen=128, avg_ts=tg, stddev_ts=0.2)]


def _peak(mib, rc=0, method="process"):
    return dict(peak_mib=mib if method == "process" else None, device_peak_mib=mib + 3, method=method, rc=rc,
                command="llama-bench ...")


def _result(label, pp, tg, error=None):
    tests = {} if error else {"pp512": {"median": pp}, "tg128": {"median": tg}}
    return dict(label=label, placement=label, budget_gib=5.0, tests=tests, peak_vram_gib=4.0, hit_rate=0.5,
                error=error)


def _report(*results):
    return dict(device="NVIDIA H100 80GB HBM3", routing="synthetic routing, preset qwen3-30b-a3b",
                expert_quant="none", distinct_experts={"min": 126, "max": 128}, results=list(results))


def test_stock_point_reads_llama_bench_rows(cmp):
    p = cmp.stock_point(40, _llama_rows(40, 1488.0, 50.4), _peak(5015))
    assert p["ncmoe"] == 40 and p["peak_mib"] == 5015 and p["peak_method"] == "process"
    assert p["pp512"] == {"avg_ts": 1488.0, "stddev_ts": 14.88} and p["tg128"]["avg_ts"] == 50.4
    assert p["llama_bench"]["build_commit"] == "abc1234"
    dev = cmp.stock_point(0, [], _peak(100, method="device"))          # no rows: a failed run
    assert dev["peak_mib"] == 103 and dev["pp512"] is None and dev["tg128"] is None


def _stock(cmp):
    points = ((24, 2230.0, 81.1, 10181), (48, 1271.0, 40.9, 2385), (40, 1488.0, 50.4, 5015))
    return [cmp.stock_point(n, _llama_rows(n, pp, tg), _peak(mib)) for n, pp, tg, mib in points]


def test_merge_table_ratios_and_errors(cmp):
    failed = _report(_result("cache", 0, 0, error="PlacementError: x|y"),
                     _result("n-cpu-moe", 0, 0, error="no"))
    ours = [cmp.ours_point(40, 5015, _peak(5100), _report(_result("cache", 1086.0, 54.6),
                                                          _result("n-cpu-moe", 1354.0, 51.1))),
            cmp.ours_point(48, 2385, _peak(900), failed),
            cmp.ours_point(24, 10181, _peak(700, rc=124), None)]
    stock = _stock(cmp)
    merged = cmp.merge(stock, ours)
    assert [r["ncmoe"] for r in merged["rows"]] == [48, 40, 24]        # most CPU layers first
    assert merged["placements"] == ["cache", "n-cpu-moe"]
    r40 = merged["rows"][1]
    assert r40["best_tg128"]["label"] == "cache" and r40["best_tg128"]["ratio"] == pytest.approx(54.6 / 50.4)
    assert r40["best_pp512"]["label"] == "n-cpu-moe"
    assert r40["best_pp512"]["ratio"] == pytest.approx(1354 / 1488)
    assert merged["rows"][0]["best_tg128"] is None and merged["rows"][2]["our_rc"] == 124
    lines = cmp.table(merged).splitlines()
    assert lines[0].startswith("| stock -ncmoe | stock peak MiB | stock pp512 | stock tg128 | our peak MiB |")
    row40 = "| 40 | 5015 | 1488 | 50.4 | 5100 | 1086 / 54.6 | 1354 / 51.1 |"
    assert lines[3] == row40 + " 0.91× (n-cpu-moe) | 1.08× (cache) |"
    assert "error: PlacementError: x/y" in lines[2] and lines[2].endswith("| – | – |")
    assert lines[4].endswith(f"| {NO_RC124} |")
    alone = cmp.table(cmp.merge(stock[:1], [cmp.ours_point(24, 10181, _peak(700, rc=1), None)]))
    assert alone.splitlines()[2] == "| 24 | 10181 | 2230 | 81.1 | 700 | no result (rc 1) | no result (rc 1) |"


def test_cli_roundtrip(cmp, tmp_path, capsys):
    (tmp_path / "raw.json").write_text(json.dumps(_llama_rows(32, 1786.0, 62.8)))
    (tmp_path / "peak.json").write_text(json.dumps(_peak(7597)))
    (tmp_path / "ours_peak.json").write_text(json.dumps(_peak(7650)))
    (tmp_path / "report.json").write_text(json.dumps(_report(_result("cache", 805.0, 72.0))))
    (tmp_path / "cut.json").write_text('{"results": [')                # a killed run's partial file
    sd, od = tmp_path / "stock", tmp_path / "ours"
    sd.mkdir()
    od.mkdir()
    peak, ours_peak = str(tmp_path / "peak.json"), str(tmp_path / "ours_peak.json")
    assert cmp.main(["stock-point", "--ncmoe", "32", "--bench", str(tmp_path / "raw.json"), "--peak", peak,
                     "--out", str(sd / "ncmoe_32.json")]) == 0
    assert cmp.main(["ours-point", "--ncmoe", "32", "--budget-mib", "7597", "--bench",
                     str(tmp_path / "report.json"), "--peak", ours_peak,
                     "--out", str(od / "ncmoe_32.json")]) == 0
    assert cmp.main(["ours-point", "--ncmoe", "0", "--budget-mib", "1", "--bench", str(tmp_path / "cut.json"),
                     "--peak", ours_peak, "--out", str(od / "ncmoe_0.json")]) == 0
    assert json.loads((od / "ncmoe_0.json").read_text())["placements"] == []
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    assert cmp.main(["merge", "--stock", str(sd), "--ours", str(od), "--md", str(md), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "| 32 | 7597 | 1786 | 62.8 | 7650 | 805 / 72.0 | 0.45× (cache) | 1.15× (cache) |" in out
    assert md.read_text().strip() == out.strip()
    assert json.loads(js.read_text())["rows"][0]["budget_mib"] == 7597


def test_one_bench_over_every_stock_budget_splits_into_points_with_window_peaks(cmp):
    stock = [cmp.stock_point(48, _llama_rows(48, 1271.0, 40.9), _peak(2385)),
             cmp.stock_point(24, _llama_rows(24, 2230.0, 81.1), _peak(10181))]
    a, b = (dict(_result("cache", 1000.0, 60.0), budget_gib=2385 / 1024, window=[10.0, 20.0]),
            dict(_result("cache", 2000.0, 90.0), budget_gib=10181 / 1024, window=[21.0, 30.0]))
    gpu = dict(_result("gpu", 5000.0, 200.0), budget_gib=None, window=[31.0, 40.0])
    series = [[12.0, 2300, 2301], [15.0, 2370, 2371], [25.0, 10100, 10102], [35.0, 17000, 17001]]
    peak = dict(_peak(17000), series=series)
    points = {p["ncmoe"]: p for p in cmp.ours_run(stock, peak, _report(a, b, gpu))}
    assert set(points) == {48, 24}                               # the unbudgeted gpu row has no stock point
    assert points[48]["peak_mib"] == 2370 and points[48]["placements"][0]["peak_mib"] == 2370
    assert points[24]["budget_mib"] == 10181 and points[24]["placements"][0]["tg128"] == 90.0
    assert cmp.window_peak(peak, [0.0, 1.0]) is None
