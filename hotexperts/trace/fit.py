"""Measured `hotexperts bench` reports -> cost-model cases, and fitting the decode terms to them (torch-free).

    cases, skipped = cases_from_report(report, shape, engine="docs/results/h200-run5/engine.json", tag="run5")
    hw2, info = fit_decode(cases, hw, cpu_rows=[ids], time_rows=[ids], free=FREE)
    predict_case(case, hw, cpu_scale=1.0) -> Prediction

A case is one placement of a bench report: its cost-model placement and predict() keyword arguments, the
measured decode tok/s and CPU kernel ms per token. Ids are "TAG:LABEL@BUDGET" (budget "-" when none), e.g.
"run5:cache+z0@16". `engine` says how the engine that measured the report behaved, for what the JSON does
not record: "current" = today's engine (auto = 0: no GPU-read misses unless "+zN"; then one per 4 misses,
per 2 for experts >= 32 MiB: the cost model's engine_share; bookkeeping deferred, overlapped), or the
options of an older one ({"gpu_share", "auto_z", "deferred_host"}) as a dict or the path of the
`engine.json` stored beside that run's results (docs/results/<run>/engine.json: run history is data).

Labels ending in "+zN" set N (the bench's --moe-gpu-misses N). The fit (docs/simulator.md, "Fitting"):
1. CPU: cpu_call_s and cpu_expert_gbs[format] by least squares of the measured cpu_ms_per_token of
   `cpu_rows` (relative errors), with the model's expected calls and CPU experts per token;
2. time: the `free` terms by least squares of the measured seconds per token of `time_rows` (relative
   errors; the model is linear in them; a term fitted below 0 is fixed at 0 and the rest refitted).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from hotexperts.errors import HotExpertsError, read_json
from hotexperts.trace.costmodel import ModelShape, Prediction, predict
from hotexperts.trace.profiles import HardwareProfile
from hotexperts.trace.real_shape import real_plan

CURRENT_ENGINE = {"gpu_share": None, "auto_z": None, "deferred_host": True}
ENGINE_KEYS = tuple(CURRENT_ENGINE)


def engine_options(engine: str | Path | dict = "current") -> dict:
    """The engine options of a report: "current", a dict, or an engine.json path (module doc)."""
    if isinstance(engine, dict):
        opts = engine
    elif str(engine) == "current":
        return dict(CURRENT_ENGINE)
    else:
        path = Path(engine)
        if path.suffix != ".json":
            raise HotExpertsError(f"unknown engine {engine!r}: 'current' or the path of an engine.json")
        opts = read_json(path, "engine description")
    missing = [k for k in ENGINE_KEYS if k not in opts]
    if missing:
        raise HotExpertsError(f"engine options lack {', '.join(missing)}")
    return {k: opts[k] for k in ENGINE_KEYS}


def report_engine(report_path: str | Path) -> str | Path:
    """The engine.json stored beside a bench report (an older engine's run), else "current"."""
    path = Path(report_path).parent / "engine.json"
    return path if path.is_file() else "current"
FREE = ("gpu_layer_s", "post_s", "host_step_s", "host_policy_s:window-lfu", "host_policy_s:auto")
TG_RE = re.compile(r"^tg(\d+)(?:@d\d+)?$")
TOPK_RE = re.compile(r"\btop-(\d+)\b")


@dataclass
class Case:
    id: str
    label: str
    placement: str                  # the bench's (Placement.describe())
    budget_gib: float | None
    cost_placement: str
    shape: ModelShape
    kw: dict                        # predict() keyword arguments
    measured_tps: float
    cpu_ms: float | None            # measured CPU kernel ms per decode token (None: not reported)
    test: str
    note: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return 1.0 / self.measured_tps


def case_id(tag: str, label, budget) -> str:
    return f"{tag}:{label}@{'-' if budget is None else f'{float(budget):g}'}"


# ---- bench report -> cases ---------------------------------------------------------------------------
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


def routed_top_k(report: dict) -> int | None:
    """The top-k of replayed routing when the report's `routing` says it (a trace's "top-6")."""
    m = TOPK_RE.search(str(report.get("routing", "")))
    return int(m.group(1)) if m else None


def gpu_misses_of(label: str, kind: str, engine: dict) -> int | None:
    """+zN in the label, else the engine's auto for the placement kind (None: the cost model's auto)."""
    m = re.search(r"\+z(\d+)", str(label or ""))
    if m:
        return int(m.group(1))
    auto = engine["auto_z"]
    if auto is None:
        return None
    return auto if kind in ("hot", "cache", "static") else 0


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
            kw["layer_hit"] = resample(hits, shape.num_moe_layers)
        else:
            kw["hit_rate"] = float(result["hit_rate"])
        if kind == "static":
            kw["policy"] = "static"
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


def resample(hits: list, n: int) -> list[float]:
    """Per-layer hit rates to the shape's MoE depth (a report of another depth is resampled)."""
    if len(hits) == n:
        return [float(h) for h in hits]
    return [float(hits[min(len(hits) - 1, i * len(hits) // n)]) for i in range(n)]


def cases_from_report(report: dict, shape: ModelShape, *, engine: str | Path | dict = "current",
                      tag: str = "", test: str | None = None, nmap: dict | None = None,
                      steps: int | None = None) -> tuple[list[Case], list[dict]]:
    """-> (cases, skipped rows {id, label, placement, budget_gib, skipped})."""
    opts = engine_options(engine)
    k = routed_top_k(report)
    if k and k != shape.top_k:
        shape = replace(shape, top_k=k)
    n_steps = decode_steps(report, steps)
    cases, skipped = [], []
    for r in report["results"]:
        cid = case_id(tag, r.get("label"), r.get("budget_gib"))
        meas = measured_tg(r, test)
        if r.get("error") or meas is None:
            skipped.append({"id": cid, "label": r.get("label"), "placement": r.get("placement"),
                            "budget_gib": r.get("budget_gib"),
                            "skipped": r.get("error") or "no tg measurement"})
            continue
        n = steps or r.get("decode_tokens") or n_steps
        placement, kw, note = cost_placement(r, shape, nmap or {}, n)
        kind = str(r["placement"]).partition(":")[0]
        z = gpu_misses_of(r.get("label"), kind, opts)
        if z is not None:
            kw["gpu_misses"] = z
        if opts["gpu_share"] is not None:
            kw["gpu_share"] = opts["gpu_share"]
        kw["deferred_host"] = opts["deferred_host"]
        cpu = r.get("cpu_ms_per_token")
        cases.append(Case(cid, str(r.get("label")), str(r.get("placement")), r.get("budget_gib"), placement,
                          shape, kw, meas[1], None if cpu is None else float(cpu), meas[0], note))
    return cases, skipped


def predict_case(case: Case, hw: HardwareProfile, cpu_scale: float = 1.0) -> Prediction:
    return predict(case.shape, hw, case.cost_placement, cpu_scale=cpu_scale, **case.kw)


def measured_cpu_scale(case: Case, hw: HardwareProfile) -> float | None:
    """The CPU-time factor that makes the model's CPU ms per token equal the measured one (None: no CPU)."""
    p = predict_case(case, hw)
    if not case.cpu_ms or p.cpu_ms <= 0:
        return None
    return case.cpu_ms / p.cpu_ms


# ---- fitting -----------------------------------------------------------------------------------------
def get_param(hw: HardwareProfile, name: str) -> float:
    key, _, sub = name.partition(":")
    if sub:
        d = getattr(hw, key)
        return float(d.get(sub, 0.0)) if isinstance(d, dict) else float(d)
    return float(getattr(hw, key))


def set_param(hw: HardwareProfile, name: str, value: float) -> HardwareProfile:
    key, _, sub = name.partition(":")
    if sub:
        d = getattr(hw, key)
        d = dict(d) if isinstance(d, dict) else {"*": float(d)}
        return replace(hw, **{key: d | {sub: float(value)}})
    return replace(hw, **{key: float(value)})


def _pick(cases: list[Case], ids) -> list[Case]:
    by = {c.id: c for c in cases}
    missing = [i for i in ids if i not in by]
    if missing:
        raise HotExpertsError(f"fit rows not in the reports: {', '.join(missing)} (have: {', '.join(by)})")
    return [by[i] for i in ids]


def _lstsq(A: list[list[float]], b: list[float]) -> list[float]:
    """Least squares by the normal equations (a handful of unknowns; Gauss-Jordan with pivoting)."""
    n = len(A[0])
    M = [[sum(r[i] * r[j] for r in A) for j in range(n)] + [sum(r[i] * y for r, y in zip(A, b, strict=True))]
         for i in range(n)]
    scale = max(abs(M[i][i]) for i in range(n)) or 1.0
    for c in range(n):
        p = max(range(c, n), key=lambda i: abs(M[i][c]))
        if abs(M[p][c]) < 1e-9 * scale:                 # (near-)collinear columns: a term no row separates
            raise HotExpertsError("the fit is under-determined: add rows that depend on every free term")
        M[c], M[p] = M[p], M[c]
        for i in range(n):
            if i != c:
                f = M[i][c] / M[c][c]
                M[i] = [a - f * bb for a, bb in zip(M[i], M[c], strict=True)]
    return [M[i][n] / M[i][i] for i in range(n)]


def fit_cpu(cases: list[Case], hw: HardwareProfile, ids) -> HardwareProfile:
    """cpu_call_s and cpu_expert_gbs[format] from the measured CPU ms per token of the cases `ids`."""
    rows = _pick(cases, ids)
    fmts = {c.shape.cpu_format for c in rows}
    if len(fmts) != 1:
        raise HotExpertsError(f"CPU fit rows mix expert formats {sorted(fmts)}")
    fmt = fmts.pop()
    A, b = [], []
    for c in rows:
        if not c.cpu_ms:
            raise HotExpertsError(f"{c.id}: no cpu_ms_per_token to fit the CPU terms on")
        calls = predict_case(c, replace(hw, cpu_call_s=1.0, cpu_expert_gbs={fmt: 1e30})).cpu_ms   # ms per 1 s
        per_expert = c.shape.expert_bytes_cpu / 1e9                      # s of one expert at 1 GB/s
        experts = predict_case(c, replace(hw, cpu_call_s=0.0, cpu_expert_gbs={fmt: 1.0})).cpu_ms / per_expert
        A.append([calls / c.cpu_ms, experts / c.cpu_ms])                # relative: rows of equal weight
        b.append(1.0)
    call_s, s_per_expert = _lstsq(A, b)
    if call_s < 0 or s_per_expert <= 0:
        raise HotExpertsError(f"CPU fit gave call {call_s * 1e6:.1f} us, {s_per_expert * 1e6:.1f} us per "
                              "expert: use rows with both few and many experts per call")
    gbs = dict(hw.cpu_expert_gbs) | {fmt: c.shape.expert_bytes_cpu / s_per_expert / 1e9}
    return replace(hw, cpu_call_s=call_s, cpu_expert_gbs=gbs)


def fit_time(cases: list[Case], hw: HardwareProfile, ids, free=FREE, iterations: int = 3) -> HardwareProfile:
    """The `free` terms (seconds) from the measured seconds per token of the cases `ids`."""
    rows = _pick(cases, ids)
    free = list(free)
    fixed: list[str] = []
    for _ in range(len(free) + 1):
        active = [f for f in free if f not in fixed]
        if len(active) > len(rows):
            raise HotExpertsError(f"{len(active)} free terms but {len(rows)} time rows")
        for _ in range(iterations):
            base = [1.0 / predict_case(c, hw).decode_tps for c in rows]
            cols = []
            for f in active:
                h = set_param(hw, f, get_param(hw, f) + 1e-6)
                cols.append([(1.0 / predict_case(c, h).decode_tps - t0) / 1e-6
                             for c, t0 in zip(rows, base, strict=True)])
            A = [[col[i] / c.seconds for col in cols] for i, c in enumerate(rows)]
            b = [(c.seconds - t0) / c.seconds for c, t0 in zip(rows, base, strict=True)]
            for f, dx in zip(active, _lstsq(A, b), strict=True):
                hw = set_param(hw, f, get_param(hw, f) + dx)
        neg = [f for f in active if get_param(hw, f) < 0]
        if not neg:
            return hw
        for f in neg:
            hw = set_param(hw, f, 0.0)
            fixed.append(f)
    return hw


def fit_decode(cases: list[Case], hw: HardwareProfile, *, cpu_rows, time_rows, free=FREE
               ) -> tuple[HardwareProfile, dict]:
    """Both stages; -> (profile, {"cpu_rows", "time_rows", "free", "values"}); values in s or GB/s."""
    hw = fit_cpu(cases, hw, cpu_rows) if cpu_rows else hw
    hw = fit_time(cases, hw, time_rows, free) if time_rows else hw
    fmt = _pick(cases, cpu_rows)[0].shape.cpu_format if cpu_rows else None
    values = {f: get_param(hw, f) for f in free}
    if fmt:
        values |= {"cpu_call_s": hw.cpu_call_s, f"cpu_expert_gbs:{fmt}": hw.cpu_gbs(fmt)}
    return hw, {"cpu_rows": list(cpu_rows), "time_rows": list(time_rows), "free": list(free),
                "values": values}


def rms_pct(errors) -> float:
    errors = list(errors)
    return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else float("nan")
