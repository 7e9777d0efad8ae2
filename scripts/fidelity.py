"""Cost-model fidelity: predicted vs measured decode tok/s for every placement of a `hotexperts bench` JSON.

    python scripts/fidelity.py BENCH.json [--profile h200|rtx4090-7950x|rtx3060-ddr4|HW.json]
        [--shape qwen3-30b-a3b] [--expert-format bf16|int8|int4] [--test tg128]
        [--n 16=24,24=20] [--decode-tokens N] [--threshold 15] [--json OUT.json]

Input: the report of hotexperts/bench/harness.py run_bench(): results[] with label, placement
(Placement.describe(): gpu | cpu | layers:N | layers:auto | hot:K | cache:... | static:...), budget_gib,
tests{name: {median, ...}}, hit_rate, layer_hit, swaps, bytes_moved, error; plus model, expert_quant,
tests, repeats, command. The prediction is trace/costmodel.py predict() for the real shape:
  shape       --shape, else the JSON's `preset`, else `--model preset:NAME` in `command`, else `model`
              (a "-mini" preset maps to its full shape, with a warning: its speed is not the full model's)
  format      --expert-format, else the JSON's expert_quant (none -> bf16 slots and bf16 CPU copy)
  N of layers:auto   --n BUDGET=N, else the result's `n_cpu_layers`, else the smallest N that fits the
              budget (bench/predict.py real_plan; marked "N est.")
  hot/cache   the measured per-layer hit rates (else the overall one) and swaps ÷ decode steps; decode steps
              = --decode-tokens, else the JSON's decode_tokens, else 4 (warm-up) + Σ tgN × repeats.
Output: a markdown table (placement, budget, measured, predicted, error %, dominant term, flag when
|error| > threshold) on stdout; --json writes the rows. Importable: rows(report, hw, ...) / table(rows).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotexperts.bench.predict import real_plan, shape_for  # noqa: E402
from hotexperts.errors import HotExpertsError  # noqa: E402
from hotexperts.trace.costmodel import SHAPES, ModelShape, predict  # noqa: E402
from hotexperts.trace.profiles import HardwareProfile, get_profile  # noqa: E402

FORMAT_TO_QUANT = {"bf16": "none", "none": "none", "int8": "int8", "int4": "int4"}
TG_RE = re.compile(r"^tg(\d+)(?:@d\d+)?$")


# ---- inputs ------------------------------------------------------------------------------------------
def load_report(path: str | Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HotExpertsError(f"cannot read the bench JSON {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise HotExpertsError(f"{path} is not a `hotexperts bench --json` report (no results[])")
    return doc


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


def decode_steps(report: dict, override: int | None = None) -> int:
    if override:
        return override
    if report.get("decode_tokens"):
        return int(report["decode_tokens"])
    tg = [int(m.group(1)) for t in report.get("tests", []) if (m := TG_RE.match(str(t)))]
    return 4 + sum(tg) * int(report.get("repeats", 1))


def measured_tg(result: dict, test: str | None) -> tuple[str, float] | None:
    tests = result.get("tests") or {}
    names = [test] if test else [t for t in tests if TG_RE.match(t) and "@" not in t] or \
        [t for t in tests if TG_RE.match(t)]
    for name in names:
        if name in tests and tests[name].get("median"):
            return name, float(tests[name]["median"])
    return None


# ---- placement -> cost-model arguments --------------------------------------------------------------
def cost_placement(result: dict, shape: ModelShape, nmap: dict, steps: int) -> tuple[str, dict, str]:
    """-> (cost-model placement, predict() keyword arguments, note)."""
    kind, _, arg = str(result["placement"]).partition(":")
    if kind in ("gpu", "cpu", "cpu-moe"):
        return ("gpu" if kind == "gpu" else "cpu-moe"), {}, ""
    if kind in ("layers", "n-cpu-moe"):
        n, note = n_cpu_layers(result, arg, shape, nmap)
        return f"n-cpu-moe:{n}", {}, note
    if kind in ("hot", "cache", "static"):
        hits = result.get("layer_hit") or None
        if hits is None and result.get("hit_rate") is None:
            raise HotExpertsError(f"{result['placement']}: no hit rate in the JSON")
        kw = {"swaps_per_token": float(result.get("swaps", 0)) / max(steps, 1)}
        if hits is not None:
            kw["layer_hit"] = _fit(hits, shape.num_moe_layers)
        else:
            kw["hit_rate"] = float(result["hit_rate"])
        k = arg if kind == "hot" and arg.isdigit() else ""
        return (f"hot:{k}" if kind == "hot" else f"cache:{cache_slots(arg, shape)}"), kw, ""
    raise HotExpertsError(f"cannot map placement {result['placement']!r} to the cost model")


def n_cpu_layers(result: dict, arg: str, shape: ModelShape, nmap: dict) -> tuple[int, str]:
    if arg.isdigit():
        return int(arg), ""
    budget = result.get("budget_gib")
    for key in (budget, -1.0):
        if key is not None and float(key) in nmap:
            return nmap[float(key)], ""
    if result.get("n_cpu_layers") is not None:
        return int(result["n_cpu_layers"]), ""
    if budget is None:
        raise HotExpertsError(f"{result['placement']}: N unknown (no budget); pass --n N")
    return real_plan(shape, float(budget))["n_cpu_moe"], "N est."


def cache_slots(arg: str, shape: ModelShape) -> int:
    """'123slots' -> 123; '8GiB' -> bytes ÷ expert size; else 0 (only VRAM depends on it)."""
    m = re.fullmatch(r"(\d+)slots", arg)
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"([0-9.]+)GiB", arg)
    return int(float(m.group(1)) * 2**30 // shape.expert_bytes_gpu) if m else 0


def _fit(hits: list, n: int) -> list[float]:
    """Per-layer hit rates to the shape's MoE depth (a report of another depth is resampled)."""
    if len(hits) == n:
        return [float(h) for h in hits]
    return [float(hits[min(len(hits) - 1, i * len(hits) // n)]) for i in range(n)]


# ---- comparison --------------------------------------------------------------------------------------
def dominant(terms: dict) -> str:
    """The term that sets the token time: `copy` whenever the copy engine is the bottleneck (the copy
    entry of the prediction is only what it adds beyond compute), else the largest term."""
    return "copy" if terms.get("copy", 0) > 0 else max(terms, key=terms.get)


def rows(report: dict, hw: HardwareProfile, shape: ModelShape, *, test: str | None = None,
         nmap: dict | None = None, steps: int | None = None, threshold: float = 15.0) -> list[dict]:
    out = []
    n_steps = decode_steps(report, steps)
    for r in report["results"]:
        row = {"label": r.get("label"), "placement": r.get("placement"), "budget_gib": r.get("budget_gib")}
        meas = measured_tg(r, test)
        if r.get("error") or meas is None:
            out.append(row | {"skipped": r.get("error") or "no tg measurement"})
            continue
        placement, kw, note = cost_placement(r, shape, nmap or {}, steps or r.get("decode_tokens") or n_steps)
        pred = predict(shape, hw, placement, **kw)
        err = 100.0 * (pred.decode_tps - meas[1]) / meas[1]
        row |= {"test": meas[0], "measured": meas[1], "predicted": pred.decode_tps, "error_pct": err,
                "cost_placement": placement, "note": note, "terms_ms": pred.decode_ms,
                "dominant": dominant(pred.decode_ms), "flag": abs(err) > threshold}
        out.append(row)
    return out


def table(rs: list[dict], threshold: float = 15.0) -> str:
    lines = ["| placement | budget GiB | measured tg tok/s | predicted | error % | dominant term | flag |",
             "|---|---|---|---|---|---|---|"]
    for r in rs:
        b = "-" if r["budget_gib"] is None else f"{r['budget_gib']:g}"
        name = f"{r['label']} ({r['placement']})"
        if "skipped" in r:
            lines.append(f"| {name} | {b} | - | - | - | - | skipped: {r['skipped']} |")
            continue
        note = f", {r['note']}" if r["note"] else ""
        ms = r["terms_ms"][r["dominant"]]
        flag = f"**>{threshold:g}%**" if r["flag"] else "ok"
        lines.append(f"| {name} [{r['cost_placement']}{note}] | {b} | {r['measured']:.1f} | "
                     f"{r['predicted']:.1f} | {r['error_pct']:+.1f} | {r['dominant']} ({ms:.2f} ms) "
                     f"| {flag} |")
    done = [r for r in rs if "skipped" not in r]
    ok = sum(not r["flag"] for r in done)
    lines.append(f"\n{ok} of {len(done)} placements within ±{threshold:g}%.")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("--profile", default="h200", help="built-in profile name or `hotexperts calibrate` JSON")
    ap.add_argument("--shape", default=None, help=f"model shape ({', '.join(SHAPES)}); default from the JSON")
    ap.add_argument("--expert-format", default=None, choices=("bf16", "int8", "int4"),
                    help="expert format (default: the JSON's expert_quant)")
    ap.add_argument("--test", default=None, help="measured test (default: the first tgN without depth)")
    ap.add_argument("--n", default=None, help="CPU layers of layers:auto per budget: 16=24,24=20 (or N)")
    ap.add_argument("--decode-tokens", type=int, default=None, help="decode steps of the swap counts")
    ap.add_argument("--threshold", type=float, default=15.0, help="flag |error| above this percent")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    try:
        report = load_report(args.bench_json)
        hw = get_profile(args.profile)
        shape, name = resolve_shape(report, args.shape, args.expert_format)
        rs = rows(report, hw, shape, test=args.test, nmap=parse_n_map(args.n), steps=args.decode_tokens,
                  threshold=args.threshold)
    except HotExpertsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Cost model vs measurement: {shape.name} (from {name!r}; GPU slots {shape.gpu_bytes_per_param:g} "
          f"B/param, CPU {shape.cpu_format}) on profile '{hw.name}' ({hw.label}); decode steps for swaps: "
          f"{decode_steps(report, args.decode_tokens)}\n")
    for w in warnings(report, shape, name):
        print(f"WARNING: {w}\n")
    print(table(rs, args.threshold))
    if args.json:
        Path(args.json).write_text(json.dumps(rs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
