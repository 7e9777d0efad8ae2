"""Routing traces of our own trained models (trace/train.py) on held-out real text, with next-layer
predictions beside them.

    requests = domain_requests(corpus, domain, n=2, prompt=256, decode=768)   held-out text only
    requests = switch_requests(corpus, prompt=256, per_domain=512)            one request, domains in turn
    rec = record(model, store, requests, predictor=None)                      -> Recorded(trace, predicted)
    save_recorded(rec, path)       the trace's .npz with one more array, `predicted` (RoutingTrace.load
                                   ignores it; trace/simulate.load_predicted reads it back)
        trace      RoutingTrace (trace/format.py): prompt = one prefill forward, then one forward per
                   decode token
        predicted  [N, Lm, P] int16 or None: column j holds layer moe_layers[j]'s experts as predicted
                   from the previous MoE layer's residual (experts/predict.py); column 0 is -1
    prediction_recall(trace, predicted, fraction=0.25) -> dict of recalls over decode tokens, layers 1..:
        selections: share of actual selections among the guesses
        misses:     share of the per-layer LRU's misses (round(fraction * E) resident, stats.lru_hits)
        prev_token: baseline, share of selections the previous token's choice at that layer covers (its
                    misses are 0 by construction: an LRU of >= k experts holds the previous token's set)

Decode is teacher-forced: each decode step feeds the next byte of the held-out text, so its routing is
that of real text read one token at a time (what a model generating that text routes), not of the small
model's own samples. `meta["notes"]` says so.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hotexperts.errors import HotExpertsError
from hotexperts.experts.predict import NextLayerPredictor
from hotexperts.experts.reference import DenseExecutor
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.record import RouteRecorder
from hotexperts.trace.simulate import PREDICTED, check_predicted
from hotexperts.trace.stats import lru_hits

TEACHER_NOTE = "decode teacher-forced on held-out real text (trace/learned.py)"


@dataclass
class Request:
    prompt: bytes
    decode: bytes
    label: str


@dataclass
class Recorded:
    trace: RoutingTrace
    predicted: np.ndarray | None


def domain_requests(corpus: dict, domain: str, n: int = 2, prompt: int = 256,
                    decode: int = 768) -> list[Request]:
    """n requests from the domain's held-out text, evenly spaced."""
    held = corpus[domain][1]
    size = prompt + decode
    if len(held) < n * size:
        raise HotExpertsError(f"domain {domain!r}: {len(held)} held-out bytes, need {n * size}")
    step = len(held) // n
    return [Request(held[i * step:i * step + prompt], held[i * step + prompt:i * step + size], domain)
            for i in range(n)]


def switch_requests(corpus: dict, prompt: int = 256, per_domain: int = 512) -> list[Request]:
    """One request: a prompt from the first domain, then per_domain decode bytes of each domain in turn
    (taken from the end of each held-out text, away from domain_requests' starts)."""
    names = sorted(corpus)
    first = corpus[names[0]][1]
    parts = [corpus[d][1][-per_domain:] for d in names]
    return [Request(first[-(prompt + per_domain):-per_domain], b"".join(parts), "switch:" + ",".join(names))]


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


@torch.no_grad()
def forward_layers(model, tokens, pos, kv, executor, predictor=None):
    """One forward with the model's pieces; -> (logits [T, V], {next layer: predicted ids [T, P]})."""
    x, rope, mask = model.prepare(tokens, pos, kv)
    preds = {}
    for layer in model.model.layers:
        h, a, ids, w = layer.pre_experts(x, rope, pos, *kv.layer(layer.layer), mask)
        if ids is None:
            x = h + a
            continue
        if predictor is not None and predictor.next_layer(layer.layer) is not None:
            preds[predictor.next_layer(layer.layer)] = predictor.predict(layer.layer, h)
        x = h + executor(layer.layer, a, ids, w)
    return model.head(x), preds


def record(model, store, requests: list[Request], predictor: NextLayerPredictor | None = None) -> Recorded:
    """Prefill each request's prompt, then teacher-force its decode bytes one forward each."""
    cfg = model.cfg
    executor = DenseExecutor({l: store.layer(l) for l in store.layers})
    recorder = RouteRecorder(cfg.moe_layers, cfg.top_k)
    executor.on_route = recorder
    col = {l: j for j, l in enumerate(cfg.moe_layers)}
    preds: list[np.ndarray] = []
    for req in requests:
        recorder.begin_request(prompt=True)
        kv = model.new_kv_cache(len(req.prompt) + len(req.decode), torch.float32, torch.device("cpu"))
        chunks = [_tensor(req.prompt)] + list(_tensor(req.decode).split(1))
        start = 0
        for i, tok in enumerate(chunks):
            recorder.mark_prompt(i == 0)
            pos = torch.arange(start, start + tok.shape[0])
            _, p = forward_layers(model, tok, pos, kv, executor, predictor)
            recorder.end_step()
            start += tok.shape[0]
            if predictor is not None:
                preds.append(_pred_rows(p, col, tok.shape[0], predictor.guesses))
    meta = dict(model=f"trained:{cfg.model_type}-e{cfg.num_experts}k{cfg.top_k}", model_type=cfg.model_type,
                num_experts=cfg.num_experts, source="trained:hotexperts", notes=[TEACHER_NOTE],
                requests=[r.label for r in requests])
    return Recorded(recorder.to_trace(meta), np.concatenate(preds) if preds else None)


def _pred_rows(preds: dict, col: dict, t: int, guesses: int) -> np.ndarray:
    out = np.full((t, len(col), guesses), -1, np.int16)
    for layer, ids in preds.items():
        out[:, col[layer], :ids.shape[1]] = ids.numpy()
    return out


def save_recorded(rec: Recorded, path: str | Path) -> Path:
    """The trace's .npz, with rec.predicted as one more array when there is one (module doc)."""
    path = rec.trace.save(path)
    if rec.predicted is not None:
        check_predicted(rec.trace, rec.predicted)
        with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z, \
                z.open(PREDICTED + ".npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(rec.predicted, np.int16), allow_pickle=False)
    return path


def prediction_recall(trace: RoutingTrace, predicted: np.ndarray, fraction: float = 0.25) -> dict:
    """Recalls over decode tokens and MoE layers 1.. (module doc)."""
    check_predicted(trace, predicted)
    dec = ~trace.is_prompt
    actual, guess = trace.ids[dec][:, 1:], predicted[dec][:, 1:]                        # [n, Lm-1, K|P]
    miss = ~lru_hits(trace, fraction)[dec][:, 1:] & (actual >= 0)
    covered = (actual[..., :, None] == guess[..., None, :]).any(-1)                    # [n, Lm-1, K]
    prev = trace.ids[np.flatnonzero(dec) - 1][:, 1:]
    same_req = (trace.request[dec] == trace.request[np.flatnonzero(dec) - 1])[:, None, None]
    by_prev = (actual[..., :, None] == prev[..., None, :]).any(-1) & same_req
    valid = actual >= 0
    return dict(selections=_share(covered, valid), misses=_share(covered, miss),
                prev_token=_share(by_prev, valid), fraction=fraction, guesses=int(predicted.shape[2]),
                decode_tokens=int(dec.sum()))


def _share(hit: np.ndarray, counted: np.ndarray) -> float:
    n = int(counted.sum())
    return float("nan") if n == 0 else float((hit & counted).sum()) / n
