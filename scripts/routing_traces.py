"""Train the small real-text MoE models, record their routing traces and measure next-layer prediction.

    python scripts/routing_traces.py --out data/traces [--seconds 240] [--models e64k4,e128k8]
        [--checkpoints build/routing-models] [--corpus-bytes 400000]

Writes, per model, <out>/<model>-<domain>.npz for the domains code, docs, legal and switch (held-out text:
trace/corpora.py, trace/learned.py), and <out>/summary.json: training settings and loss curve, per-layer
distinct experts, locality statistics (trace/stats.py) and next-layer prediction recall (k and k+2 guesses,
misses of a per-layer LRU at 12.5% and 25% residency). --checkpoints keeps the trained weights (torch.save;
not committed: tens of MB). Deterministic for the same seeds on one installation, up to CPU timing when
--seconds cuts training short (the step count reached is in summary.json; pass --steps to fix it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hotexperts.experts.predict import NextLayerPredictor
from hotexperts.experts.store import ExpertStore
from hotexperts.models.split import expert_act
from hotexperts.models.transformer import MoETransformer
from hotexperts.trace import stats
from hotexperts.trace.corpora import DOMAINS, corpus
from hotexperts.trace.learned import (
    domain_requests,
    prediction_recall,
    record,
    save_recorded,
    switch_requests,
)
from hotexperts.trace.train import Trained, TrainSpec, model_config, train
from hotexperts.weights import LayerExperts

MODELS = {"e64k4": TrainSpec(num_experts=64, top_k=4, seq_len=128),
          "e128k8": TrainSpec(num_experts=128, top_k=8, seq_len=128)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/traces")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--corpus-bytes", type=int, default=400_000)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=768)
    ap.add_argument("--checkpoints", default=None,
                    help="keep trained weights here; reuse them when present")
    ap.add_argument("--record-threads", type=int, default=1,
                    help="torch threads while recording (many tiny ops: 1 avoids thread contention)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = corpus(args.corpus_bytes)
    corpus_sizes = {d: {"train_bytes": len(t), "heldout_bytes": len(h)} for d, (t, h) in text.items()}
    for name in args.models.split(","):
        summary = {"corpus": corpus_sizes, "model": one_model(name, text, args, out)}
        (out / f"{name}-summary.json").write_text(json.dumps(summary, indent=1))


def one_model(name: str, text: dict, args, out: Path) -> dict:
    base = MODELS[name]
    spec = TrainSpec(**{**base.__dict__, "steps": args.steps, "max_seconds": args.seconds})
    t0 = time.perf_counter()
    trained = trained_model(name, spec, text, args.checkpoints)
    res = {"spec": spec.__dict__, "train_seconds": round(trained.seconds, 1), "log": trained.log,
           "steps_run": trained.log[-1][0] + 1, "traces": {}}
    torch.set_num_threads(args.record_threads)
    predictor = NextLayerPredictor.from_model(trained.model, extra=2)
    reqs = {d: domain_requests(text, d, 2, args.prompt, args.decode) for d in DOMAINS}
    reqs["switch"] = switch_requests(text, args.prompt, args.decode // 2)
    for dom, rq in reqs.items():
        rec = record(trained.model, trained.store, rq, predictor)
        save_recorded(rec, out / f"{name}-{dom}.npz")                # with its predictions
        res["traces"][dom] = trace_summary(rec, trained.cfg.top_k)
        print(name, dom, json.dumps(res["traces"][dom]["recall"]), flush=True)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def trained_model(name: str, spec: TrainSpec, text: dict, checkpoints: str | None) -> Trained:
    """Train `spec`, or load `checkpoints`/<name>.pt when it exists (the weights, log and time of a run)."""
    path = Path(checkpoints) / f"{name}.pt" if checkpoints else None
    if path is not None and path.exists():
        ck = torch.load(path, weights_only=False)
        cfg = model_config(spec)
        model = MoETransformer(cfg)
        model.load_state_dict(ck["model"])
        for p in model.parameters():
            p.requires_grad_(False)
        store = ExpertStore({int(l): LayerExperts(w13, w2, None, expert_act(cfg)) for l, (w13, w2) in
                             ck["experts"].items()})
        return Trained(spec, cfg, model.eval(), store, ck.get("log", []), ck.get("seconds", 0.0))

    def progress(step, lm, aux):
        print(f"{name} step {step} lm {lm:.3f} aux {aux:.3f}", flush=True)

    trained = train(spec, text, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"spec": spec.__dict__, "model": trained.model.state_dict(), "log": trained.log,
                    "seconds": trained.seconds,
                    "experts": {l: (trained.store.layer(l).w13, trained.store.layer(l).w2)
                                for l in trained.store.layers}}, path)
    return trained


def trace_summary(rec, k: int) -> dict:
    t = rec.trace
    s = stats.summarize(t, fractions=(0.125, 0.25, 0.5))
    s["distinct_per_layer"] = stats.distinct_experts(t.decode_only()).tolist()
    recall = {}
    for f in (0.125, 0.25):
        for p in (k, k + 2):
            r = prediction_recall(t, rec.predicted[..., :p], f)
            recall[f"{f:g}@{p}"] = {key: r[key] for key in ("selections", "misses", "prev_token")}
    return {"tokens": t.num_tokens, "decode_tokens": int((~t.is_prompt).sum()), "stats": s, "recall": recall}


if __name__ == "__main__":
    main()
