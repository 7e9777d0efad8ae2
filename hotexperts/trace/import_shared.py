"""Import the real routing traces of ../shared/traces/ into `RoutingTrace` (numpy only, no torch).

Sources (formats and caveats from each folder's README.md; the data is never copied into the repo):
  Mario928__speculative-moe/*_routing.jsonl   Mixtral-8x7B-Instruct (vLLM, FP8), 8 experts x 32 layers,
      top-2, decode tokens only; one JSON object per (problem, layer, token). ~1% of cells missing
      (the collector dropped rows with weights exactly [0.5, 0.5]) -> ids -1, weights NaN.
  Helldez__BigMoeOnEdge/*.route.csv           Qwen3-30B-A3B / Gemma-4-26B-A4B / gpt-oss-120b (GGUF Q4_K_M,
      llama.cpp-based), top-k REDUCED (8->6, 8->6, 4->2); one row per routed expert; prefill + decode.
      In prefill the last layer is missing for all but the final prompt position (qwen, gpt-oss).

Public API:
  find_shared_traces(root=None) -> Path | None     $HOTEXPERTS_SHARED_TRACES, root, or ../shared/traces
  SHARED_TRACES: name -> (folder, file glob)       "mixtral-8x7b", "qwen3-30b-a3b", "gemma-4-26b-a4b",
                                                   "gpt-oss-120b"
  load_shared(name, root=None) -> RoutingTrace
  load_mixtral_jsonl(paths) -> RoutingTrace
  load_route_csv(path) -> RoutingTrace
  import_trace(src) -> RoutingTrace                 a name above, a .npz, a .route.csv, a *_routing.jsonl
                                                   file, or a folder holding either kind
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hotexperts.trace.format import RoutingTrace, TraceFormatError, concat

ENV_VAR = "HOTEXPERTS_SHARED_TRACES"
MIXTRAL_DIR = "Mario928__speculative-moe"
EDGE_DIR = "Helldez__BigMoeOnEdge"
SHARED_TRACES = {
    "mixtral-8x7b": (MIXTRAL_DIR, "*_routing.jsonl"),
    "qwen3-30b-a3b": (EDGE_DIR, "qwen.route.csv"),
    "gemma-4-26b-a4b": (EDGE_DIR, "gemma.route.csv"),
    "gpt-oss-120b": (EDGE_DIR, "gptoss.route.csv"),
}
# .route.csv arch -> (model name, native top-k)
_EDGE_MODELS = {"qwen3moe": ("Qwen3-30B-A3B", 8), "gemma4": ("Gemma-4-26B-A4B", 8),
                "gpt-oss": ("gpt-oss-120b", 4)}
_EDGE_BY_STEM = {"qwen": "qwen3moe", "gemma": "gemma4", "gptoss": "gpt-oss"}


def find_shared_traces(root: str | Path | None = None) -> Path | None:
    """The shared traces folder: $HOTEXPERTS_SHARED_TRACES, else `root`, else ../shared/traces next to
    the repository (or the working directory). None when none of them exists."""
    candidates = [os.environ.get(ENV_VAR), root]
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "traces", Path.cwd().parent / "shared" / "traces"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def load_shared(name: str, root: str | Path | None = None) -> RoutingTrace:
    if name not in SHARED_TRACES:
        raise TraceFormatError(f"unknown shared trace {name!r}; known: {', '.join(SHARED_TRACES)}")
    base = find_shared_traces(root)
    if base is None:
        raise TraceFormatError(f"shared traces folder not found (set ${ENV_VAR} or place ../shared/traces)")
    folder, pattern = SHARED_TRACES[name]
    files = sorted((base / folder).glob(pattern))
    if not files:
        raise TraceFormatError(f"no {pattern} under {base / folder}")
    return load_mixtral_jsonl(files) if folder == MIXTRAL_DIR else load_route_csv(files[0])


def import_trace(src: str | Path) -> RoutingTrace:
    """Load any supported source (see module docstring)."""
    if str(src) in SHARED_TRACES:
        return load_shared(str(src))
    p = Path(src)
    if p.is_dir():
        jsonl, csv = sorted(p.glob("*_routing.jsonl")), sorted(p.glob("*.route.csv"))
        if jsonl:
            return load_mixtral_jsonl(jsonl)
        if len(csv) == 1:
            return load_route_csv(csv[0])
        raise TraceFormatError(f"{p}: expected *_routing.jsonl files or exactly one *.route.csv, "
                               f"found {len(jsonl)} and {len(csv)}")
    if not p.is_file():
        raise TraceFormatError(f"trace source not found: {src} (known names: {', '.join(SHARED_TRACES)})")
    if p.suffix == ".npz":
        return RoutingTrace.load(p)
    if p.name.endswith(".route.csv"):
        return load_route_csv(p)
    if p.suffix == ".jsonl":
        return load_mixtral_jsonl([p])
    raise TraceFormatError(f"{p}: unknown trace format (want .npz, .route.csv or *_routing.jsonl)")


# ---- Mixtral (vLLM jsonl) -----------------------------------------------------------------------

def load_mixtral_jsonl(paths: Sequence[str | Path]) -> RoutingTrace:
    """One request per (file, problem_id); decode tokens only; missing cells -> -1 / NaN."""
    parts = []
    for path in paths:
        records = _read_jsonl(Path(path))
        for pid in sorted({r["problem_id"] for r in records}):
            parts.append(_mixtral_request([r for r in records if r["problem_id"] == pid]))
    if not parts:
        raise TraceFormatError(f"no routing records in {[str(p) for p in paths]}")
    trace = concat(parts)
    names = ", ".join(Path(p).name for p in paths)
    trace.meta["source"] = f"shared:{MIXTRAL_DIR}/{{{names}}}"
    trace.meta["notes"] = [
        "vLLM, neuralmagic/Mixtral-8x7B-Instruct-v0.1-FP8, greedy, GSM8K/HumanEval problems 0-1",
        "decode tokens only (prefill dropped by the collector)",
        f"{trace.missing_fraction():.1%} of (token, layer) cells missing (rows with weights [0.5, 0.5] "
        "dropped by the collector): ids -1, weights NaN",
        "licence: none found; do not redistribute",
    ]
    return trace


def _read_jsonl(path: Path) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise TraceFormatError(f"{path}: cannot read routing jsonl: {e}") from None


def _mixtral_request(records: list[dict]) -> RoutingTrace:
    n = 1 + max(r["token_idx"] for r in records)
    num_layers = 1 + max(r["layer"] for r in records)
    k = len(records[0]["experts"])
    ids = np.full((n, num_layers, k), -1, np.int16)                       # [N, Lm, K]
    weights = np.full((n, num_layers, k), np.nan, np.float32)
    for r in records:
        ids[r["token_idx"], r["layer"]] = r["experts"]
        weights[r["token_idx"], r["layer"]] = r["gating_probs"]
    meta = dict(model="Mixtral-8x7B-Instruct-v0.1", num_experts=8, top_k=k,
                moe_layers=list(range(num_layers)), source="",
                dataset=records[0].get("dataset"), native_top_k=2)
    return RoutingTrace(ids, weights, np.zeros(n, bool), np.zeros(n, np.int32), meta)


# ---- BigMoeOnEdge (.route.csv) ------------------------------------------------------------------

def load_route_csv(path: str | Path) -> RoutingTrace:
    """Tokens keyed by (turn, step) in order; phase 0 = prompt; one request per turn."""
    path = Path(path)
    header, rows = _read_route_csv(path)
    n_layer, n_expert, k = int(header["n_layer"]), int(header["n_expert"]), int(header["n_expert_used"])
    turn, phase, step, layer, slot, expert, weight = (rows[:, i] for i in range(7))
    keys = turn.astype(np.int64) * (1 << 32) + step.astype(np.int64)
    uniq, tok = np.unique(keys, return_inverse=True)                      # token index per row
    ids = np.full((len(uniq), n_layer, k), -1, np.int16)                  # [N, Lm, K]
    weights = np.full((len(uniq), n_layer, k), np.nan, np.float32)
    li, si = layer.astype(np.int64), slot.astype(np.int64)
    ids[tok, li, si] = expert.astype(np.int16)
    weights[tok, li, si] = weight
    is_prompt = np.zeros(len(uniq), bool)
    is_prompt[tok] = phase == 0
    request = (uniq >> 32).astype(np.int32)
    arch = header.get("arch", "")
    model, native_k = _EDGE_MODELS.get(arch, (Path(header.get("model", path.stem)).stem, k))
    meta = dict(model=model, num_experts=n_expert, top_k=k, moe_layers=list(range(n_layer)),
                source=f"shared:{EDGE_DIR}/{path.name}", native_top_k=native_k, arch=arch,
                expert_bytes=header["expert_bytes"])
    trace = RoutingTrace(ids, weights, is_prompt, request, meta)
    trace.meta["notes"] = [
        "BigMoeOnEdge bmoe-cli (llama.cpp-based), GGUF Q4_K_M, greedy, one prompt",
        f"top-k reduced from native {native_k} to {k}: later layers route as the reduced-k model",
        f"{trace.prompt_only().missing_fraction():.1%} of prompt cells missing (last layer evaluated only "
        "for the final prompt position); decode complete",
        "licence: Apache-2.0 (Helldez/BigMoeOnEdge)",
    ]
    return trace


def _read_route_csv(path: Path) -> tuple[dict, np.ndarray]:
    """-> (header fields from the `#` preamble, rows [R, 7] float64: turn..weight)."""
    header: dict = {"expert_bytes": {}}
    data: list[str] = []
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("#"):
                    _parse_preamble(line[1:].split(), header)
                elif line.strip() and not line.startswith("turn"):
                    data.append(line)
        rows = np.loadtxt(data, delimiter=",", usecols=range(7), ndmin=2)
    except (OSError, ValueError) as e:
        raise TraceFormatError(f"{path}: cannot read route csv: {e}") from None
    if "n_layer" not in header or rows.size == 0:
        raise TraceFormatError(f"{path}: not a route_trace csv (no '# ... n_layer=' preamble or no rows)")
    return header, rows


def _parse_preamble(fields: list[str], header: dict) -> None:
    kv = dict(f.split("=", 1) for f in fields if "=" in f)
    if "layer" in kv and "expert_bytes" in kv:
        header["expert_bytes"][kv["layer"]] = int(kv["expert_bytes"])
    else:
        header.update(kv)
