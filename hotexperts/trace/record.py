"""Record routing from live generation (the `hotexperts trace` command: cli/trace.py).

RouteRecorder is the executor's `on_route(layer, ids [T,K], weights [T,K])` callback: each call copies the
layer's choices to the host once (ids and weights packed into one float32 tensor) and writes them into
preallocated numpy buffers [capacity, Lm, K] that grow by doubling. A new forward pass starts when a call's
MoE layer is not after the previous call's (or after `end_step()`); its T tokens take the next T rows.
Recording is off by default: the executor's `on_route` is None except inside `record()`.
The caller says what the tokens are: `begin_request()` (new request, prompt tokens follow) and
`mark_prompt(False)` once generation starts. `to_trace(meta)` returns a `RoutingTrace`.

read_prompts(path, chat) reads --prompts (one user message per non-empty line) or --chat (one JSON
transcript per line, {"messages": [...]} or a bare list; the prompt is the transcript up to and including
its last user message); encode_prompts applies the chat template (raw=True: encode as is).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hotexperts.errors import HotExpertsError
from hotexperts.trace.format import RoutingTrace


class RouteRecorder:
    def __init__(self, moe_layers: Sequence[int], top_k: int, capacity: int = 4096):
        self.moe_layers = [int(x) for x in moe_layers]
        self.top_k = int(top_k)
        self._col = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._alloc(max(1, capacity))
        self._n = 0                      # tokens recorded
        self._base = 0                   # first row of the open forward pass
        self._t = 0                      # tokens in the open forward pass
        self._last_col = None            # column of the previous call; None = no open forward
        self._step = -1
        self._request = -1
        self._prompt = True

    def _alloc(self, cap: int) -> None:
        lm, k = len(self.moe_layers), self.top_k
        self._ids = np.full((cap, lm, k), -1, np.int16)                    # [cap, Lm, K]
        self._w = np.full((cap, lm, k), np.nan, np.float16)
        self._is_prompt = np.zeros(cap, bool)
        self._req = np.zeros(cap, np.int32)
        self._steps = np.zeros(cap, np.int32)

    def _grow(self, need: int) -> None:
        cap = len(self._is_prompt)
        if need <= cap:
            return
        old = (self._ids, self._w, self._is_prompt, self._req, self._steps)
        self._alloc(max(need, 2 * cap))
        for dst, src in zip((self._ids, self._w, self._is_prompt, self._req, self._steps), old, strict=True):
            dst[:cap] = src

    # ---- what the tokens are ------------------------------------------------------------------
    def begin_request(self, prompt: bool = True) -> None:
        self._request += 1
        self._prompt = prompt
        self.end_step()

    def mark_prompt(self, prompt: bool) -> None:
        self._prompt = bool(prompt)

    def end_step(self) -> None:
        """Close the open forward pass (optional: a call for an earlier layer also starts a new one)."""
        self._last_col = None

    @property
    def num_tokens(self) -> int:
        return self._n

    # ---- the on_route callback ----------------------------------------------------------------
    def __call__(self, layer: int, ids, weights) -> None:
        col = self._col.get(int(layer))
        if col is None:
            raise HotExpertsError(f"on_route: layer {layer} is not a MoE layer {self.moe_layers}")
        host = _to_host(ids, weights)                                       # [T, 2K] float32
        t, k = host.shape[0], host.shape[1] // 2
        if k != self.top_k:
            raise HotExpertsError(f"on_route: got {k} experts per token, recorder expects {self.top_k}")
        if self._last_col is None or col <= self._last_col or t != self._t:
            self._open_forward(t)
        self._last_col = col
        rows = slice(self._base, self._base + t)
        self._ids[rows, col] = host[:, :k]
        self._w[rows, col] = host[:, k:]

    def _open_forward(self, t: int) -> None:
        if self._request < 0:
            self.begin_request(self._prompt)
        self._base, self._t, self._step = self._n, t, self._step + 1
        self._grow(self._n + t)
        rows = slice(self._n, self._n + t)
        self._is_prompt[rows], self._req[rows], self._steps[rows] = self._prompt, self._request, self._step
        self._n += t

    def to_trace(self, meta: dict) -> RoutingTrace:
        """meta must give num_experts (model, source default to "unknown", "recorded")."""
        full = dict(model="unknown", source="recorded", top_k=self.top_k, moe_layers=self.moe_layers)
        full.update(meta)
        n = self._n
        return RoutingTrace(self._ids[:n].copy(), self._w[:n].copy(), self._is_prompt[:n].copy(),
                            self._req[:n].copy(), full, self._steps[:n].copy())


def _to_host(ids, weights) -> np.ndarray:
    """ids [T,K], weights [T,K] (torch or numpy) -> [T, 2K] float32 numpy with one device->host copy."""
    if hasattr(ids, "detach"):
        import torch

        packed = torch.cat([ids.detach().to(torch.float32), weights.detach().to(torch.float32)], dim=1)
        return packed.cpu().numpy()
    return np.concatenate([np.asarray(ids, np.float32), np.asarray(weights, np.float32)], axis=1)


# ---- live recording -----------------------------------------------------------------------------

def attach(engine, recorder: RouteRecorder) -> None:
    """Set the engine's executor `on_route` to the recorder."""
    engine.executor.on_route = recorder


def record(engine, prompts: list[list[int]], params, meta: dict | None = None) -> RoutingTrace:
    """Generate every prompt with `engine` and return the routing of prompt and generated tokens."""
    cfg = engine.config
    recorder = RouteRecorder(cfg.moe_layers, cfg.top_k)
    attach(engine, recorder)
    try:
        for ids in prompts:
            recorder.begin_request(prompt=True)
            for i, _ in enumerate(engine.generate(ids, params)):
                if i == 0:
                    recorder.mark_prompt(False)        # forwards after the first token are decode steps
    finally:
        engine.executor.on_route = None
    base = dict(model=cfg.model_type, model_type=cfg.model_type, num_experts=cfg.num_experts,
                source="recorded:hotexperts")
    return recorder.to_trace({**base, **(meta or {})})


def read_prompts(path: str | Path, chat: bool) -> list:
    """--prompts: list[str] (one per non-empty line); --chat: list[list[message]]."""
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise HotExpertsError(f"cannot read {path}: {e}") from None
    if not chat:
        return lines
    out = []
    for i, ln in enumerate(lines, 1):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise HotExpertsError(f"{path}:{i}: not JSON: {e}") from None
        msgs = obj.get("messages") if isinstance(obj, dict) else obj
        users = [j for j, m in enumerate(msgs or []) if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise HotExpertsError(f"{path}:{i}: a transcript needs a list of messages with a user turn")
        out.append(msgs[: users[-1] + 1])
    return out


def encode_prompts(tokenizer, prompts: list, raw: bool) -> list[list[int]]:
    out = []
    for p in prompts:
        if raw and isinstance(p, str):
            out.append(list(tokenizer.encode(p)))
            continue
        msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
        ids = tokenizer.apply_chat_template(msgs)
        out.append(list(tokenizer.encode(ids)) if isinstance(ids, str) else [int(x) for x in ids])
    return out


# ---- CLI ----------------------------------------------------------------------------------------
