"""The routing trace: per token and MoE layer, which experts the router chose and with what weights.

Contract (docs/architecture.md "Routing trace (.npz)"; numpy only, no torch):

    ids        [N, Lm, K] int16    expert ids, token-major in time order; -1 = missing cell
    weights    [N, Lm, K] float16  router weights of those experts (NaN = unknown)
    is_prompt  [N] bool            token was part of a prompt (prefill) rather than generated
    request    [N] int32           request index; a request boundary is where it changes
    step       [N] int32           optional: forward-pass index of each token (see `iterations()`)
    meta       dict                model, num_experts, top_k, moe_layers (decoder-layer indices, one per
                                   column of Lm), source, notes (free-form list of caveats)

On disk: `np.savez_compressed` with the arrays above plus `meta` (0-d str, JSON) and `format_version`
(0-d int). `load()` raises `TraceFormatError` with one clear message on a missing, corrupt or
inconsistent file.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hotexperts.errors import HotExpertsError

FORMAT_VERSION = 1
REQUIRED_META = ("model", "num_experts", "top_k", "moe_layers", "source")


class TraceFormatError(HotExpertsError):
    """A routing trace file is missing, corrupt, or its arrays do not agree with each other."""


@dataclass
class RoutingTrace:
    ids: np.ndarray                 # [N, Lm, K] int16
    weights: np.ndarray             # [N, Lm, K] float16
    is_prompt: np.ndarray           # [N] bool
    request: np.ndarray             # [N] int32
    meta: dict = field(default_factory=dict)
    step: np.ndarray | None = None  # [N] int32 or None (derived from is_prompt/request)

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int16)
        self.weights = np.asarray(self.weights, dtype=np.float16)
        self.is_prompt = np.asarray(self.is_prompt, dtype=bool)
        self.request = np.asarray(self.request, dtype=np.int32)
        if self.step is not None:
            self.step = np.asarray(self.step, dtype=np.int32)
        self.meta = dict(self.meta)
        self.meta.setdefault("notes", [])
        _validate(self)

    # ---- shape -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def moe_layers(self) -> list[int]:
        return [int(x) for x in self.meta["moe_layers"]]

    def missing_fraction(self) -> float:
        """Share of (token, layer) cells with no recorded expert."""
        if self.ids.size == 0:
            return 0.0
        return float((self.ids[:, :, 0] < 0).mean())

    def iterations(self) -> np.ndarray:
        """[N] int: forward-pass index per token. Stored `step` if present; otherwise the consecutive
        prompt tokens of one request share one iteration (one prefill pass) and every generated token
        has its own."""
        if self.step is not None:
            return self.step.copy()
        if self.num_tokens == 0:
            return np.zeros(0, np.int64)
        same_prefill = self.is_prompt[1:] & self.is_prompt[:-1] & (self.request[1:] == self.request[:-1])
        return np.concatenate([[0], np.cumsum(~same_prefill)]).astype(np.int64)

    # ---- views -------------------------------------------------------------------------------
    def take(self, rows: np.ndarray) -> RoutingTrace:
        """A new trace of the tokens selected by `rows` (bool mask [N] or indices), meta copied."""
        step = None if self.step is None else self.step[rows]
        return RoutingTrace(self.ids[rows], self.weights[rows], self.is_prompt[rows], self.request[rows],
                            _copy_meta(self.meta), step)

    def decode_only(self) -> RoutingTrace:
        return self.take(~self.is_prompt)

    def prompt_only(self) -> RoutingTrace:
        return self.take(self.is_prompt)

    def select_layers(self, layers: Sequence[int]) -> RoutingTrace:
        """Keep the MoE layers whose decoder-layer index is in `layers` (in the trace's order)."""
        cols = [i for i, layer in enumerate(self.moe_layers) if layer in set(layers)]
        if len(cols) != len(set(layers)):
            raise TraceFormatError(f"layers {sorted(set(layers))} not all in the trace's moe_layers "
                                   f"{self.moe_layers}")
        meta = _copy_meta(self.meta)
        meta["moe_layers"] = [self.moe_layers[i] for i in cols]
        return RoutingTrace(self.ids[:, cols], self.weights[:, cols], self.is_prompt, self.request, meta,
                            self.step)

    # ---- files -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(ids=self.ids, weights=self.weights, is_prompt=self.is_prompt, request=self.request,
                      meta=np.array(json.dumps(self.meta)), format_version=np.array(FORMAT_VERSION))
        if self.step is not None:
            arrays["step"] = self.step
        with open(path, "wb") as f:               # a file object keeps numpy from appending ".npz"
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        path = Path(path)
        if not path.is_file():
            raise TraceFormatError(f"routing trace not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise TraceFormatError(f"{path} is not a readable routing trace (.npz): {e}") from None
        return _from_arrays(data, path)


def concat(traces: Sequence[RoutingTrace]) -> RoutingTrace:
    """Join traces of the same model shape in order; request indices are renumbered to stay distinct."""
    if not traces:
        raise TraceFormatError("concat needs at least one trace")
    first = traces[0]
    for t in traces[1:]:
        if t.ids.shape[1:] != first.ids.shape[1:] or t.num_experts != first.num_experts:
            raise TraceFormatError(f"cannot concat traces of shapes {first.ids.shape[1:]} and "
                                   f"{t.ids.shape[1:]}")
    requests, offset = [], 0
    for t in traces:
        _, r = np.unique(t.request, return_inverse=True)
        requests.append(r.astype(np.int32) + offset)
        offset += int(r.max()) + 1 if r.size else 0
    steps = None
    if all(t.step is not None for t in traces):
        steps, base = [], 0
        for t in traces:
            steps.append(t.step - (t.step.min() if t.step.size else 0) + base)
            base = int(steps[-1].max()) + 1 if t.step.size else base
        steps = np.concatenate(steps)
    meta = _copy_meta(first.meta)
    meta["notes"] = list(dict.fromkeys(n for t in traces for n in t.meta.get("notes", [])))
    return RoutingTrace(np.concatenate([t.ids for t in traces]), np.concatenate([t.weights for t in traces]),
                        np.concatenate([t.is_prompt for t in traces]), np.concatenate(requests), meta, steps)


def _copy_meta(meta: dict) -> dict:
    return json.loads(json.dumps(meta))


def _from_arrays(data: dict, path: Path) -> RoutingTrace:
    names = ("ids", "weights", "is_prompt", "request", "meta", "format_version")
    missing = [k for k in names if k not in data]
    if missing:
        raise TraceFormatError(f"{path} is not a routing trace: missing arrays {missing}")
    version = int(data["format_version"])
    if version != FORMAT_VERSION:
        raise TraceFormatError(f"{path}: trace format version {version}, this build reads {FORMAT_VERSION}")
    try:
        meta = json.loads(str(data["meta"]))
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{path}: meta is not valid JSON: {e}") from None
    try:
        return RoutingTrace(data["ids"], data["weights"], data["is_prompt"], data["request"], meta,
                            data.get("step"))
    except TraceFormatError as e:
        raise TraceFormatError(f"{path}: {e}") from None


def _validate(t: RoutingTrace) -> None:
    if t.ids.ndim != 3:
        raise TraceFormatError(f"ids must be [N, Lm, K], got shape {t.ids.shape}")
    n, lm, k = t.ids.shape
    if t.weights.shape != t.ids.shape:
        raise TraceFormatError(f"weights shape {t.weights.shape} != ids shape {t.ids.shape}")
    for name in ("is_prompt", "request") + (("step",) if t.step is not None else ()):
        if getattr(t, name).shape != (n,):
            raise TraceFormatError(f"{name} must have shape ({n},), got {getattr(t, name).shape}")
    absent = [key for key in REQUIRED_META if key not in t.meta]
    if absent:
        raise TraceFormatError(f"meta lacks {absent}")
    if len(t.meta["moe_layers"]) != lm or int(t.meta["top_k"]) != k:
        raise TraceFormatError(f"meta (moe_layers={len(t.meta['moe_layers'])}, top_k={t.meta['top_k']}) "
                               f"disagrees with ids shape {t.ids.shape}")
    if t.ids.size and (t.ids.min() < -1 or t.ids.max() >= int(t.meta["num_experts"])):
        raise TraceFormatError(f"expert ids outside [-1, {int(t.meta['num_experts']) - 1}]")
