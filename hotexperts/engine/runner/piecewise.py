"""Piecewise decode: the T=1 step as CUDA graphs around an executor that needs the host between layers.

A hybrid executor reads routing on the host every MoE layer, so the whole step cannot be one graph and an
eager step pays ~45 launches per layer. Here everything that is fixed-shape and host-free is captured, as
the decode stages (runner/stages.py; torch.compile'd ones when runner.compile_decode(model) is on):

    pre      token, position -> x[0] (embedding), y[0] = 0, rope, decode attention bias     (one graph)
    layer l  x[l] + y[l] -> x[l+1] = h, xn[l], ids[l], weights[l]  (residual add, norms, attention, router,
             shared expert; one graph); dense-MLP layers: x[l+1] = h, y[l+1] = mlp(xn)
             eager: y[l+1] = executor(l, xn[l], ids[l], weights[l])
    head     x[L] + y[L] -> logits                                                           (one graph)

All tensors crossing a boundary live in static buffers; graphs share one memory pool. Capture is lazy, with
the real token and position (warm-up passes rewrite the same K/V entries the real step writes), and a capture
failure falls back to eager decoding with a warning. `capture` is injectable: tests on CPU pass
`EagerCapture`, which re-runs the captured function on replay, so the buffer plumbing runs in CI.
Status: opt-in (`--piecewise-graph`); the plumbing is tested on CPU, the CUDA capture itself is not yet
measured on a GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import warnings

import torch

from hotexperts.engine.runner.compiled import decode_forward, decode_stages
from hotexperts.engine.runner.cuda_graph import stage_token
from hotexperts.models.cache import restore_recurrent, snapshot_recurrent


class EagerCapture:
    """Stand-in for a CUDA graph: runs `fn` now (the warm-up) and again on every replay."""

    def __init__(self, fn, pool=None):
        self.fn = fn
        fn()

    def replay(self) -> None:
        self.fn()


class CudaCapture:
    """Warm up `fn` once eagerly on a side stream, then capture it into a CUDA graph in `pool`."""

    def __init__(self, fn, pool=None):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class PiecewiseDecodeStep:
    """(token, pos) -> logits [V]; same contract as cuda_graph.EagerDecodeStep."""

    def __init__(self, model, kv, executor, device: torch.device, capture=None):
        self.model, self.kv, self.executor, self.device = model, kv, executor, torch.device(device)
        self.capture = capture or (CudaCapture if self.device.type == "cuda" else EagerCapture)
        self.pool = torch.cuda.graph_pool_handle() if self.capture is CudaCapture else None
        self.tok = torch.zeros(1, dtype=torch.long, device=self.device)                   # [1]
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)                   # [1]
        self.stages: list | None = None
        self.failed = False

    @property
    def graphed(self) -> bool:
        return self.stages is not None and self.capture is CudaCapture

    # ---- static buffers and stage functions ------------------------------------------------------------
    def _buffers(self) -> None:
        cfg, dev = self.model.cfg, self.device
        dtype = self.model.model.embed_tokens.weight.dtype
        L, D, K = cfg.num_layers, cfg.hidden_size, cfg.top_k
        self.x = [torch.zeros(1, D, dtype=dtype, device=dev) for _ in range(L + 1)]     # residual in
        self.y = [torch.zeros(1, D, dtype=dtype, device=dev) for _ in range(L + 1)]     # added to x[l]
        moe = [l.is_moe for l in self.model.model.layers]
        self.xn = [torch.zeros(1, D, dtype=dtype, device=dev) if m else None for m in moe]
        self.ids = [torch.zeros(1, K, dtype=torch.long, device=dev) if m else None for m in moe]
        self.w = [torch.zeros(1, K, dtype=dtype, device=dev) if m else None for m in moe]
        self.logits = torch.zeros(1, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.rope = self.bias = None

    def _pre(self) -> None:
        x, y, rope, bias = self.st.prepare(self.model, self.tok, self.pos, self.kv)
        self.x[0].copy_(x)
        self.y[0].copy_(y)
        if self.rope is None:                                   # first run: allocate, then copy into
            self.rope = tuple(t.clone() for t in rope)
            self.bias = bias.clone()
        for dst, src in zip(self.rope, rope, strict=True):
            dst.copy_(src)
        self.bias.copy_(bias)

    def _layer(self, i: int):
        layer = self.model.model.layers[i]
        kc, vc = self.kv.layer(i)

        def run() -> None:
            h, a, ids, w = self.st.layer(layer, self.x[i], self.y[i], self.rope, self.pos, kc, vc, self.bias)
            self.x[i + 1].copy_(h)
            if ids is None:                                     # dense layer: a = mlp(xn)
                self.y[i + 1].copy_(a)
                return
            self.xn[i].copy_(a)
            self.ids[i].copy_(ids)
            self.w[i].copy_(w)
        return run

    def _head(self) -> None:
        self.logits.copy_(self.st.head(self.model, self.x[-1], self.y[-1]))

    def _compile(self) -> None:
        """Compiled stages: run every piece once (compiling them) before any capture; if compiling fails,
        (warned) the plain stages are captured instead."""
        if not self.st.compiled:
            return
        try:
            layers = [self._layer(i) for i in range(len(self.model.model.layers))]
            for run in [self._pre, *layers, self._head]:
                run()
            self.st.ready = True
        except Exception as exc:
            warnings.warn(f"torch.compile of the piecewise decode stages failed ({type(exc).__name__}: "
                          f"{exc}); capturing them uncompiled", RuntimeWarning, stacklevel=4)
            self.st.failed = True
            self.st = decode_stages(self.model)
            self.rope = self.bias = None

    def _build(self) -> None:
        self.st = decode_stages(self.model)
        self._buffers()
        self._compile()
        stages = [self.capture(self._pre, self.pool)]
        for i in range(len(self.model.model.layers)):   # warm-up inputs: y[l] of MoE layers stays 0 (no
            stages.append(self.capture(self._layer(i), self.pool))   # executor; K/V at pos is redone)
        stages.append(self.capture(self._head, self.pool))
        self.stages = stages

    # ---- the step ---------------------------------------------------------------------------------------
    def _experts(self, i: int) -> None:
        if self.ids[i] is not None:
            self.y[i + 1].copy_(self.executor(i, self.xn[i], self.ids[i], self.w[i]))   # [1, D]

    def _eager(self, token, pos: int) -> torch.Tensor:
        tok = torch.as_tensor(token, dtype=torch.long, device=self.device).reshape(1)
        ipos = torch.tensor([pos], dtype=torch.long, device=self.device)
        return decode_forward(self.model, tok, ipos, self.kv, self.executor)[-1]

    def __call__(self, token: int | torch.Tensor, pos: int) -> torch.Tensor:
        with torch.no_grad(), stage_token(self.model, token):
            if self.failed or self.executor.on_route is not None:
                return self._eager(token, pos)
            if isinstance(token, torch.Tensor):
                self.tok.copy_(token.reshape(1))
            else:
                self.tok.fill_(int(token))
            self.pos.fill_(pos)
            if self.stages is None and not self._try_build():
                return self._eager(token, pos)
            pre, *layers, head = self.stages
            pre.replay()
            for i, stage in enumerate(layers):
                stage.replay()
                self._experts(i)
            head.replay()
            return self.logits[-1]

    def _try_build(self) -> bool:
        saved = snapshot_recurrent(self.kv)          # the warm-ups advance a linear layer's state: put back
        try:
            self._build()
            return True
        except Exception as exc:  # a capture failure must not kill generation: fall back, loudly
            warnings.warn(f"piecewise CUDA graph capture failed ({exc!r}); decoding eagerly",
                          RuntimeWarning, stacklevel=3)
            self.failed, self.stages = True, None
            return False
        finally:
            restore_recurrent(self.kv, saved)
