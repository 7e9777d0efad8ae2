"""Stock llama.cpp (llama-bench) beside `hotexperts bench` at equal measured VRAM: one table, one JSON.

    python3 scripts/stock/compare.py stock-point --ncmoe N --bench RAW.json --peak PEAK.json --out POINT.json
    python3 scripts/stock/compare.py ours-point --ncmoe N --budget-mib B --peak PEAK.json
                                     [--bench REPORT.json] --out POINT.json
    python3 scripts/stock/compare.py merge --stock DIR_OR_FILE... --ours DIR_OR_FILE... [--md OUT.md]
                                     [--json OUT.json]

stock-point: llama-bench's `-o json` rows (pp512 and tg128: avg_ts / stddev_ts as llama-bench reports them)
plus scripts/stock/peak.py's JSON (nvidia-smi peak of the process, CUDA context included) -> one point.
ours-point: a `hotexperts bench --json` report run at budget B MiB (stock's measured peak at -ncmoe N) plus
the peak of our process measured the same way -> one point (no report: the run failed, rc kept).
merge: points -> one markdown table:
    stock -ncmoe | stock peak MiB | stock pp512 | stock tg128 | our peak MiB | PLACEMENT pp512 / tg128 ... |
    ours ÷ stock pp512 | ours ÷ stock tg128
where each ratio is our best placement on that test (named) over stock; a placement that failed shows its
error. Prints the table. No torch or hotexperts imports (runs anywhere; tests/scripts/test_compare_stock.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TESTS = {"pp512": (512, 0), "tg128": (0, 128)}          # name -> (n_prompt, n_gen) in llama-bench's rows


# ---- points ----------------------------------------------------------------------------------------------
def stock_point(ncmoe: int, rows: list[dict], peak: dict) -> dict:
    """llama-bench rows + peak -> {ncmoe, peak_mib, pp512: {avg_ts, stddev_ts}, tg128: {...}, ...}."""
    point = dict(ncmoe=ncmoe, peak_mib=_peak(peak), peak_method=peak.get("method"), rc=peak.get("rc"),
                 command=peak.get("command"))
    for name, (n_prompt, n_gen) in TESTS.items():
        row = next((r for r in rows if r.get("n_prompt") == n_prompt and r.get("n_gen") == n_gen), None)
        point[name] = None if row is None else dict(avg_ts=row["avg_ts"], stddev_ts=row.get("stddev_ts"))
    if rows:
        first = rows[0]
        keys = ("build_commit", "build_number", "gpu_info", "cpu_info", "model_type", "model_size",
                "n_cpu_moe", "n_threads", "n_ubatch", "flash_attn", "load_mode")
        point["llama_bench"] = {k: first.get(k) for k in keys}
    return point


def ours_point(ncmoe: int, budget_mib: int, peak: dict, report: dict | None) -> dict:
    """Our bench report at budget B + peak -> {ncmoe, budget_mib, peak_mib, placements: [...], ...}."""
    point = dict(ncmoe=ncmoe, budget_mib=budget_mib, peak_mib=_peak(peak), peak_method=peak.get("method"),
                 rc=peak.get("rc"), command=peak.get("command"), placements=[])
    if report is None:
        return point
    point.update(device=report.get("device"), routing=report.get("routing"),
                 distinct_experts=report.get("distinct_experts"), expert_format=report.get("expert_quant"))
    for r in report.get("results", []):
        tests = r.get("tests") or {}
        point["placements"].append(dict(
            label=r["label"], placement=r.get("placement"), error=r.get("error"), hit_rate=r.get("hit_rate"),
            torch_peak_gib=r.get("peak_vram_gib"),
            **{name: (tests.get(name) or {}).get("median") for name in TESTS}))
    return point


def window_peak(peak: dict, window) -> int | None:
    """The process (else device) MiB peak of the samples inside [start, end] (unix seconds)."""
    if not window:
        return None
    a, b = window
    col = 1 if peak.get("method") != "device" else 2
    vals = [row[col] for row in peak.get("series") or [] if a <= row[0] <= b and row[col] is not None]
    return max(vals) if vals else None


def ours_run(stock: list[dict], peak: dict, report: dict) -> list[dict]:
    """One `hotexperts bench` process over every stock point's peak as a budget (the model loaded once): one
    point per budget, each placement's peak from the nvidia-smi samples inside its window (the bench records
    it; placements run one after another and free their memory in between). Rows without a budget (the gpu
    reference) have no stock point and are left out."""
    by_budget = {round(p["peak_mib"]): p["ncmoe"] for p in stock if p.get("peak_mib")}
    rows: dict[int, list[dict]] = {}
    for r in report.get("results", []):
        n = None if r.get("budget_gib") is None else by_budget.get(round(r["budget_gib"] * 1024))
        if n is not None:
            rows.setdefault(n, []).append(r)
    points = []
    for n, results in rows.items():
        mib = round(results[0]["budget_gib"] * 1024)
        point = ours_point(n, mib, dict(peak, peak_mib=None), dict(report, results=results))
        for q, r in zip(point["placements"], results, strict=True):
            q["peak_mib"] = window_peak(peak, r.get("window"))
        seen = [q["peak_mib"] for q in point["placements"] if q["peak_mib"] is not None]
        point["peak_mib"] = max(seen) if seen else None
        points.append(point)
    return points


def _peak(peak: dict) -> int | None:
    return peak.get("peak_mib") if peak.get("peak_mib") is not None else peak.get("device_peak_mib")


# ---- merge -----------------------------------------------------------------------------------------------
def merge(stock: list[dict], ours: list[dict]) -> dict:
    """Rows by stock -ncmoe (most CPU layers first), our placements in order of first appearance."""
    by_n = {p["ncmoe"]: p for p in ours}
    labels: list[str] = []
    for p in ours:
        labels += [q["label"] for q in p["placements"] if q["label"] not in labels]
    rows = []
    for s in sorted(stock, key=lambda p: -p["ncmoe"]):
        o = by_n.get(s["ncmoe"])
        row = dict(ncmoe=s["ncmoe"], stock_peak_mib=s["peak_mib"], stock=_speeds(s),
                   budget_mib=None if o is None else o["budget_mib"],
                   our_peak_mib=None if o is None else o["peak_mib"],
                   ours={} if o is None else {q["label"]: q for q in o["placements"]},
                   our_rc=None if o is None else o["rc"])
        for name in TESTS:
            row[f"best_{name}"] = _best(row["ours"].values(), name, row["stock"][name])
        rows.append(row)
    return dict(placements=labels, rows=rows)


def _speeds(s: dict) -> dict:
    return {name: (s.get(name) or {}).get("avg_ts") for name in TESTS}


def _best(results, test: str, stock_ts: float | None) -> dict | None:
    ok = [q for q in results if not q.get("error") and q.get(test)]
    if not ok:
        return None
    q = max(ok, key=lambda q: q[test])
    return dict(label=q["label"], ts=q[test], ratio=q[test] / stock_ts if stock_ts else None)


# ---- markdown --------------------------------------------------------------------------------------------
def table(merged: dict) -> str:
    labels = merged["placements"]
    head = (["stock -ncmoe", "stock peak MiB", "stock pp512", "stock tg128", "our peak MiB"]
            + [f"{lab} pp512 / tg128" for lab in labels] + ["ours ÷ stock pp512", "ours ÷ stock tg128"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in merged["rows"]:
        cells = [str(r["ncmoe"]), _int(r["stock_peak_mib"]), _f(r["stock"]["pp512"], 0),
                 _f(r["stock"]["tg128"], 1), _int(r["our_peak_mib"])]
        for lab in labels:
            cells.append(_cell(r["ours"].get(lab), r["our_rc"]))
        failed = not r["ours"] and r["our_rc"] not in (0, None)         # our run left no report at all
        cells += [f"no result (rc {r['our_rc']})"] * 2 if failed else [_ratio(r["best_pp512"]),
                                                                        _ratio(r["best_tg128"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(q: dict | None, rc) -> str:
    if q is None:
        return "–" if rc in (0, None) else f"no result (rc {rc})"
    if q.get("error"):
        return "error: " + str(q["error"]).replace("|", "/")[:60]
    return f"{_f(q.get('pp512'), 0)} / {_f(q.get('tg128'), 1)}"


def _ratio(best: dict | None) -> str:
    if best is None or best["ratio"] is None:
        return "–"
    return f"{best['ratio']:.2f}× ({best['label']})"


def _f(v, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _int(v) -> str:
    return "–" if v is None else str(int(v))


# ---- files -----------------------------------------------------------------------------------------------
def load_points(paths: list[str]) -> list[dict]:
    """Point JSONs from files and from folders (every *.json directly inside)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return [json.loads(f.read_text()) for f in files]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stock-point")
    o = sub.add_parser("ours-point")
    for p in (s, o):
        p.add_argument("--ncmoe", type=int, required=True)
        p.add_argument("--peak", required=True)
        p.add_argument("--out", required=True)
    s.add_argument("--bench", required=True, help="llama-bench -o json output")
    o.add_argument("--bench", default=None, help="hotexperts bench --json report (absent: the run failed)")
    o.add_argument("--budget-mib", type=int, required=True)
    r = sub.add_parser("ours-run", help="one bench over every stock peak -> ncmoe_N.json per budget")
    r.add_argument("--stock", nargs="+", required=True)
    r.add_argument("--bench", required=True)
    r.add_argument("--peak", required=True)
    r.add_argument("--out-dir", required=True)
    m = sub.add_parser("merge")
    m.add_argument("--stock", nargs="+", required=True)
    m.add_argument("--ours", nargs="+", required=True)
    m.add_argument("--md", default=None)
    m.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "merge":
        merged = merge(load_points(a.stock), load_points(a.ours))
        text = table(merged)
        print(text)
        if a.md:
            Path(a.md).write_text(text + "\n")
        if a.json:
            Path(a.json).write_text(json.dumps(merged, indent=1))
        return 0
    peak = json.loads(Path(a.peak).read_text())
    bench = _read_json(a.bench)
    if a.cmd == "ours-run":
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for point in ours_run(load_points(a.stock), peak, bench if isinstance(bench, dict) else {}):
            (out / f"ncmoe_{point['ncmoe']}.json").write_text(json.dumps(point, indent=1))
            print(f"-ncmoe {point['ncmoe']}: budget {point['budget_mib']} MiB, our peak {point['peak_mib']} "
                  "MiB")
        return 0
    if a.cmd == "stock-point":
        point = stock_point(a.ncmoe, bench if isinstance(bench, list) else [], peak)
    else:
        point = ours_point(a.ncmoe, a.budget_mib, peak, bench if isinstance(bench, dict) else None)
    Path(a.out).write_text(json.dumps(point, indent=1))
    return 0


def _read_json(path: str | None):
    """The file's JSON, or None when it is missing, empty or cut short (a killed run)."""
    if not path or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        return None


if __name__ == "__main__":
    sys.exit(main())
