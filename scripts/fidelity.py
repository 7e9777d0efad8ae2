"""Cost-model fidelity: predicted vs measured decode tok/s for every placement of `hotexperts bench` JSONs.

    python scripts/fidelity.py BENCH.json [BENCH2.json ...] [--engine current|ENGINE.json[,...]]
        [--tag T[,...]] [--profile h200|rtx4090-7950x|rtx3060-ddr4|HW.json] [--shape qwen3-30b-a3b]
        [--expert-format bf16|int8|int4] [--test tg128] [--n 16=24,24=20] [--decode-tokens N]
        [--threshold 15] [--json OUT.json]
        [--fit [--fit-cpu ID,...] [--fit-time ID,...] [--free TERM,...] [--save-profile HW.json] [--loo]]

Input: reports of hotexperts/bench/harness.py run_bench(): results[] with label, placement
(Placement.describe(): gpu | cpu | layers:N | layers:auto | hot:K | cache:... | static:...), budget_gib,
tests{name: {median, ...}}, hit_rate, layer_hit, swaps, cpu_ms_per_token, error; plus model, expert_quant,
routing, tests, repeats, command. Each result becomes a case of hotexperts/trace/fit.py (cost placement,
predict() arguments; ids "TAG:LABEL@BUDGET"):
  shape       --shape, else the JSON's `preset`, else `--model preset:NAME` in `command`, else `model`
              (a "-mini" preset maps to its full shape, with a warning); top-k from the routing when it
              says "top-N" (a replayed trace)
  format      --expert-format, else the JSON's expert_quant (none -> bf16 slots and bf16 CPU copy)
  engine      what the JSON does not record (fit.py engine_options, docs/results/<run>/engine.json):
              GPU-computed misses per layer (auto and rule; "+zN" labels set N) and whether host
              bookkeeping overlaps the step; one per JSON
  N of layers:auto   --n BUDGET=N, else the result's `n_cpu_layers`, else bench/predict.py real_plan
  hot/cache   measured per-layer hit rates and swaps ÷ decode steps (--decode-tokens, the JSON's
              decode_tokens, else 4 + Σ tgN × repeats)
  tag         --tag, else from the path: ".../h200-run5/bench_..._synthetic.json" -> run5, "..._trace..."
              -> run5-trace
Output: a markdown table per placement: measured, predicted, error %, the prediction with the CPU kernel
time set to the measured cpu_ms_per_token (isolates the non-CPU terms), CPU ms measured / predicted, the
dominant term, whether the row was used to fit the profile ("time" / "cpu" / "held out"; from the profile's
sources["fit"] or --fit), flag when |error| > threshold. --fit first fits the decode terms (fit.py) on the
given rows (default: FIT_H200) and predicts with the fitted profile; --save-profile writes it; --loo
prints each fitted row's error under a fit without it.
Importable: rows(report, hw, shape, ...) / table(rows) / fit_rows(...).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotexperts.bench.predict import shape_for  # noqa: E402
from hotexperts.errors import HotExpertsError  # noqa: E402
from hotexperts.trace import fit as F  # noqa: E402
from hotexperts.trace.costmodel import SHAPES, ModelShape  # noqa: E402
from hotexperts.trace.profiles import HardwareProfile, get_profile, save_hardware  # noqa: E402

FORMAT_TO_QUANT = {"bf16": "none", "none": "none", "int8": "int8", "int4": "int4"}
decode_steps, measured_tg, cost_placement = F.decode_steps, F.measured_tg, F.cost_placement
# The rows the built-in "h200" profile was fitted on (docs/simulator.md): CPU terms from the CPU kernel time
# of 8-expert calls (cpu-moe) and 1-2-expert calls (hot, cache z0); time terms from the gpu row (graphed
# per-layer GPU time), cpu-moe (post + collect), the 24 GiB all-resident rows of run 4 (hybrid executor and
# policy bookkeeping) and run 5's hot and cache z0. Everything else is held out.
FIT_H200 = {
    "cpu": ["run5:cpu-moe@16", "run5:hot@16", "run5:cache+z0@16"],
    "time": ["run5:gpu@-", "run5:cpu-moe@16", "run4:n-cpu-moe@24", "run4:hot@24", "run4:cache@24",
             "run5:hot@16", "run5:cache+z0@16"],
}


# ---- inputs ------------------------------------------------------------------------------------------
def load_report(path: str | Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HotExpertsError(f"cannot read the bench JSON {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise HotExpertsError(f"{path} is not a `hotexperts bench --json` report (no results[])")
    return doc


def default_tag(path: str | Path) -> str:
    p = Path(path)
    m = re.fullmatch(r"(?:[a-z0-9]+-)?(run\d+)", p.parent.name)
    tag = m.group(1) if m else p.stem
    return f"{tag}-trace" if m and "_trace" in p.stem else tag


def model_name(report: dict, shape: str | None = None) -> str:
    if shape:
        return shape
    if report.get("preset"):
        return str(report["preset"]).removeprefix("preset:")
    m = re.search(r"--model[ =]preset:(\S+)", str(report.get("command", "")))
    if m:
        return m.group(1)
    return re.sub(r"[^a-z0-9.]+", "-", str(report.get("model", "")).lower())


def resolve_shape(report: dict, shape: str | None = None, fmt: str | None = None) -> tuple[ModelShape, str]:
    name = model_name(report, shape)
    quant = FORMAT_TO_QUANT.get(fmt or str(report.get("expert_quant", "none")))
    if quant is None:
        bad = fmt or report.get("expert_quant")
        raise HotExpertsError(f"unknown expert format {bad!r}: bf16, int8, int4")
    s = shape_for(name, quant)
    if s is None:
        raise HotExpertsError(f"no cost-model shape for model {name!r}: pass --shape "
                              f"({', '.join(SHAPES)})")
    return s, name


def parse_n_map(text: str | None) -> dict[float, int]:
    """'16=24,24=20' -> {16.0: 24, 24.0: 20} (budget GiB -> CPU layers); a bare '24' applies to all."""
    out: dict[float, int] = {}
    for item in (t.strip() for t in (text or "").split(",") if t.strip()):
        key, _, val = item.rpartition("=")
        try:
            out[float(key) if key else -1.0] = int(val)
        except ValueError:
            raise HotExpertsError(f"--n: cannot read {item!r} (use BUDGET=N, e.g. 16=24,24=20)") from None
    return out


# ---- comparison --------------------------------------------------------------------------------------
def dominant(terms: dict) -> str:
    """The term that sets the token time: `copy` whenever the copy engine is the bottleneck (the copy
    entry of the prediction is only what it adds beyond compute), else the largest term."""
    return "copy" if terms.get("copy", 0) > 0 else max(terms, key=terms.get)


def fit_roles(hw: HardwareProfile, fitted: dict | None = None) -> dict[str, str]:
    """case id -> "time" | "cpu" | "time+cpu" for the rows a profile was fitted on."""
    fit = fitted if fitted is not None else (hw.sources or {}).get("fit") or {}
    roles: dict[str, list[str]] = {}
    for role in ("time", "cpu"):
        for i in fit.get(f"{role}_rows", fit.get(role, [])):
            roles.setdefault(i, []).append(role)
    return {i: "+".join(r) for i, r in roles.items()}


def case_row(case: F.Case, hw: HardwareProfile, threshold: float, roles: dict) -> dict:
    pred = F.predict_case(case, hw)
    err = 100.0 * (pred.decode_tps - case.measured_tps) / case.measured_tps
    scale = F.measured_cpu_scale(case, hw)
    with_cpu = F.predict_case(case, hw, cpu_scale=scale).decode_tps if scale else pred.decode_tps
    return {"id": case.id, "label": case.label, "placement": case.placement, "budget_gib": case.budget_gib,
            "test": case.test, "measured": case.measured_tps, "predicted": pred.decode_tps, "error_pct": err,
            "predicted_measured_cpu": with_cpu,
            "error_measured_cpu_pct": 100.0 * (with_cpu - case.measured_tps) / case.measured_tps,
            "cpu_ms_measured": case.cpu_ms, "cpu_ms_predicted": pred.cpu_ms,
            "cost_placement": case.cost_placement, "note": case.note, "terms_ms": pred.decode_ms,
            "dominant": dominant(pred.decode_ms), "fit": roles.get(case.id, "held out"),
            "flag": abs(err) > threshold}


def rows(report: dict, hw: HardwareProfile, shape: ModelShape, *, test: str | None = None,
         nmap: dict | None = None, steps: int | None = None, threshold: float = 15.0,
         engine: str = "current", tag: str = "", fitted: dict | None = None) -> list[dict]:
    cases, skipped = F.cases_from_report(report, shape, engine=engine, tag=tag, test=test, nmap=nmap,
                                         steps=steps)
    roles = fit_roles(hw, fitted)
    order = {F.case_id(tag, r.get("label"), r.get("budget_gib")): i for i, r in enumerate(report["results"])}
    out = [case_row(c, hw, threshold, roles) for c in cases] + skipped
    return sorted(out, key=lambda r: order.get(r["id"], 0))


def table(rs: list[dict], threshold: float = 15.0) -> str:
    lines = ["| placement | budget GiB | measured tg tok/s | predicted | error % | with measured CPU "
             "(error %) | CPU ms/tok measured / predicted | dominant term | fit | flag |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        b = "-" if r["budget_gib"] is None else f"{r['budget_gib']:g}"
        name = f"{r['label']} ({r['placement']})"
        if "skipped" in r:
            lines.append(f"| {name} | {b} | - | - | - | - | - | - | - | skipped: {r['skipped']} |")
            continue
        note = f", {r['note']}" if r["note"] else ""
        ms = r["terms_ms"][r["dominant"]]
        flag = f"**>{threshold:g}%**" if r["flag"] else "ok"
        cpu = "-" if not r["cpu_ms_measured"] and not r["cpu_ms_predicted"] else \
            f"{r['cpu_ms_measured'] or 0:.2f} / {r['cpu_ms_predicted']:.2f}"
        lines.append(f"| {name} [{r['cost_placement']}{note}] | {b} | {r['measured']:.1f} | "
                     f"{r['predicted']:.1f} | {r['error_pct']:+.1f} | {r['predicted_measured_cpu']:.1f} "
                     f"({r['error_measured_cpu_pct']:+.1f}) | {cpu} | {r['dominant']} ({ms:.2f} ms) | "
                     f"{r['fit']} | {flag} |")
    done = [r for r in rs if "skipped" not in r]
    ok = sum(not r["flag"] for r in done)
    lines.append(f"\n{ok} of {len(done)} placements within ±{threshold:g}%.")
    held = [r for r in done if r.get("fit", "held out") == "held out"]
    if held and len(held) < len(done):
        ok_h = sum(not r["flag"] for r in held)
        lines.append(f"Held out (not used by the fit): {ok_h} of {len(held)} within ±{threshold:g}%; "
                     f"RMS error {F.rms_pct(r['error_pct'] for r in held):.1f}% (fitted rows "
                     f"{F.rms_pct(r['error_pct'] for r in done if r not in held):.1f}%).")
    return "\n".join(lines)


def warnings(report: dict, shape: ModelShape, name: str) -> list[str]:
    out = []
    if name.endswith("-mini"):
        out.append(f"{name} is a tiny-width model: its measured speed is not the full shape's")
    depths = {len(r["layer_hit"]) for r in report["results"] if r.get("layer_hit")}
    if depths - {shape.num_moe_layers}:
        out.append(f"the report has {sorted(depths)} MoE layers, the shape {shape.num_moe_layers}: per-layer "
                   "hit rates resampled; is --shape the model that was benchmarked?")
    return out


def fit_rows(cases: list[F.Case], hw: HardwareProfile, cpu_ids, time_ids, free=F.FREE
             ) -> tuple[HardwareProfile, dict]:
    """Fit the profile's decode terms on the given case ids; the fit is recorded in sources["fit"]."""
    hw2, info = F.fit_decode(cases, hw, cpu_rows=cpu_ids, time_rows=time_ids, free=free)
    src = dict(hw2.sources or {})
    src["fit"] = {"cpu_rows": list(cpu_ids), "time_rows": list(time_ids), "free": list(free)}
    return replace(hw2, sources=src), info


def leave_one_out(cases: list[F.Case], hw: HardwareProfile, cpu_ids, time_ids, free=F.FREE) -> list[dict]:
    """Each fitted row predicted by a fit without it (its CPU row too): the error a new row would see.
    A row whose removal leaves a term undetermined is reported with the reason instead."""
    by = {c.id: c for c in cases}
    out = []
    for rid in dict.fromkeys(list(time_ids) + list(cpu_ids)):
        cpu = [i for i in cpu_ids if i != rid]
        time_rows = [i for i in time_ids if i != rid]
        try:
            h, _ = F.fit_decode(cases, hw, cpu_rows=cpu if len(cpu) >= 2 else [], time_rows=time_rows,
                                free=free)
        except HotExpertsError as e:
            out.append({"id": rid, "error": str(e)})
            continue
        c = by[rid]
        tps = F.predict_case(c, h).decode_tps
        out.append({"id": rid, "measured": c.measured_tps, "predicted": tps,
                    "error_pct": 100.0 * (tps - c.measured_tps) / c.measured_tps})
    return out


def loo_table(rs: list[dict]) -> str:
    lines = ["| fitted row | measured tg tok/s | predicted by a fit without it | error % |",
             "|---|---|---|---|"]
    for r in rs:
        if "error" in r:
            lines.append(f"| {r['id']} | - | - | not identifiable: {r['error']} |")
        else:
            lines.append(f"| {r['id']} | {r['measured']:.1f} | {r['predicted']:.1f} | "
                         f"{r['error_pct']:+.1f} |")
    return "\n".join(lines)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", nargs="+")
    ap.add_argument("--profile", default="h200", help="built-in profile name or `hotexperts calibrate` JSON")
    ap.add_argument("--engine", default=None, help="current | ENGINE.json, one or one per JSON (default: "
                    "the engine.json beside each report, else current)")
    ap.add_argument("--tag", default=None, help="row id prefix per JSON (default: from the path)")
    ap.add_argument("--shape", default=None, help=f"model shape ({', '.join(SHAPES)}); default from the JSON")
    ap.add_argument("--expert-format", default=None, choices=("bf16", "int8", "int4"),
                    help="expert format (default: the JSON's expert_quant)")
    ap.add_argument("--test", default=None, help="measured test (default: the first tgN without depth)")
    ap.add_argument("--n", default=None, help="CPU layers of layers:auto per budget: 16=24,24=20 (or N)")
    ap.add_argument("--decode-tokens", type=int, default=None, help="decode steps of the swap counts")
    ap.add_argument("--threshold", type=float, default=15.0, help="flag |error| above this percent")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--fit", action="store_true", help="fit the decode terms first (default rows: FIT_H200)")
    ap.add_argument("--fit-cpu", default=None, help="case ids for the CPU terms (comma list)")
    ap.add_argument("--fit-time", default=None, help="case ids for the time terms (comma list)")
    ap.add_argument("--free", default=None, help=f"time terms to fit (default {','.join(F.FREE)})")
    ap.add_argument("--save-profile", default=None, help="with --fit: write the fitted profile JSON")
    ap.add_argument("--loo", action="store_true", help="with --fit: leave-one-out errors of the fitted rows")
    args = ap.parse_args(argv)
    try:
        hw = get_profile(args.profile)
        paths = args.bench_json
        tags = _split(args.tag) or [default_tag(p) for p in paths]
        engines = _split(args.engine) or [F.report_engine(p) for p in paths]
        if len(engines) == 1:
            engines = engines * len(paths)
        if len(tags) != len(paths) or len(engines) != len(paths):
            raise HotExpertsError("--tag and --engine take one value per bench JSON")
        inputs = []
        for path, tag, engine in zip(paths, tags, engines, strict=True):
            report = load_report(path)
            shape, name = resolve_shape(report, args.shape, args.expert_format)
            inputs.append((path, tag, engine, report, shape, name))
        fitted = None
        if args.fit:
            cases = [c for (_, tag, engine, report, shape, _) in inputs
                     for c in F.cases_from_report(report, shape, engine=engine, tag=tag, test=args.test,
                                                  nmap=parse_n_map(args.n), steps=args.decode_tokens)[0]]
            cpu_ids = _split(args.fit_cpu) or FIT_H200["cpu"]
            time_ids = _split(args.fit_time) or FIT_H200["time"]
            free = _split(args.free) or list(F.FREE)
            hw, info = fit_rows(cases, hw, cpu_ids, time_ids, free)
            fitted = hw.sources["fit"]
            print("Fitted terms (hotexperts/trace/fit.py; CPU rows: " + ", ".join(cpu_ids) + "; time rows: "
                  + ", ".join(time_ids) + "):\n")
            for k, v in info["values"].items():
                print(f"    {k:28s} {v:.4g}" + ("" if "gbs" in k else f"   ({v * 1e6:.1f} us)"))
            print()
            if args.save_profile:
                save_hardware(args.save_profile, replace(hw, label="fitted"))
            if args.loo:
                print("Leave-one-out (each fitted row predicted by a fit without it):\n\n"
                      + loo_table(leave_one_out(cases, hw, cpu_ids, time_ids, free)) + "\n")
        all_rows = []
        for path, tag, engine, report, shape, name in inputs:
            rs = rows(report, hw, shape, test=args.test, nmap=parse_n_map(args.n), steps=args.decode_tokens,
                      threshold=args.threshold, engine=engine, tag=tag, fitted=fitted)
            k = F.routed_top_k(report)
            print(f"## {path} (tag {tag}, engine {engine})\n\nCost model vs measurement: {shape.name} (from "
                  f"{name!r}; top-{k or shape.top_k}; GPU slots {shape.gpu_bytes_per_param:g} B/param, CPU "
                  f"{shape.cpu_format}) on profile '{hw.name}' ({hw.label}); swaps per token over each "
                  f"result's decode_tokens (else {decode_steps(report, args.decode_tokens)} steps)\n")
            for w in warnings(report, shape, name):
                print(f"WARNING: {w}\n")
            print(table(rs, args.threshold) + "\n")
            all_rows += rs
    except HotExpertsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(inputs) > 1:
        print("## All reports\n\n" + table(all_rows, args.threshold).split("\n\n", 1)[-1].strip())
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
