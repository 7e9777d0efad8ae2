"""The T=1 decode step as a function of (token, position) -> logits [V], eager or replayed from a CUDA graph.

runner.make_decode_step(model, kv, executor, device) picks one (engine/runner/__init__.py):
  - `GraphDecodeStep` on CUDA, when the executor declares itself capturable (`executor.graph_safe is True`:
    no host syncs, no data-dependent shapes, no host-side effects inside `__call__`): captures the T=1
    forward once (gpt-fast style: static token / position buffers on the device, a static logits output)
    and replays it for every later token;
  - `EagerDecodeStep`: one decode_forward (runner/compiled.py: the compiled stages if the model has them,
    else the model's own forward) per call.
While `executor.on_route` is set (routing trace recording), steps run eagerly: a replay runs no Python.
Both return logits [V] in the model's dtype on the model's device; neither calls `executor.end_step()`
(the Generator does, after every step); both call the executor's optional `before_step()` right before
launching a step (the hybrid executor then does the previous step's bookkeeping while this one runs).
Capture is lazy (first call) and happens with the real token and
position, so warm-up passes only rewrite the same K/V entries the real step writes; the state they advance (a
linear-attention layer's conv and recurrent state, models/cache.recurrent_buffers) is put back after each, so
the replay computes the step from the state the step was called with. The first warm-up runs
with torch's sync debug mode "error": an executor that claims graph_safe but synchronises with the host is
caught there (warning, eager from then on) instead of invalidating a capture. With a compiled decode on
(runner.compile_decode(model), runner/compiled.py), one more forward before that warm-up compiles it
(Dynamo + Inductor + Triton autotuning, which synchronise), on the current stream: a capture only ever
records compiled kernels that have already run.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from hotexperts.engine.runner.compiled import compiled_stages, decode_forward
from hotexperts.models.cache import restore_recurrent, snapshot_recurrent
from hotexperts.models.transforms import staged_embedding


class EagerDecodeStep:
    graphed = False

    def __init__(self, model, kv, executor, device: torch.device):
        self.model, self.kv, self.executor, self.device = model, kv, executor, device

    def __call__(self, token: int | torch.Tensor, pos: int) -> torch.Tensor:
        tok = torch.as_tensor(token, dtype=torch.long, device=self.device).reshape(1)   # [1]
        ipos = torch.tensor([pos], dtype=torch.long, device=self.device)                 # [1]
        before_step(self.executor)
        with torch.no_grad(), stage_token(self.model, token):
            return decode_forward(self.model, tok, ipos, self.kv, self.executor)[-1]     # [V]


class GraphDecodeStep(EagerDecodeStep):
    """Captures the T=1 forward in a CUDA graph on first use; falls back to eager if capture fails."""

    warmup_iters = 2

    def __init__(self, model, kv, executor, device: torch.device):
        super().__init__(model, kv, executor, device)
        self.static_tok = torch.zeros(1, dtype=torch.long, device=device)    # [1]
        self.static_pos = torch.zeros(1, dtype=torch.long, device=device)    # [1]
        self.static_logits: torch.Tensor | None = None                         # [1, V]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False

    @property
    def graphed(self) -> bool:                     # type: ignore[override]
        return self.graph is not None

    def __call__(self, token: int | torch.Tensor, pos: int) -> torch.Tensor:
        if self.failed or self.executor.on_route is not None:   # a replay skips Python
            return super().__call__(token, pos)
        if isinstance(token, torch.Tensor):
            self.static_tok.copy_(token.reshape(1))
        else:
            self.static_tok.fill_(int(token))          # a scalar kernel argument: no host-to-device copy
        self.static_pos.fill_(pos)
        before_step(self.executor)                     # before warm-up forwards too: they post like a step
        with stage_token(self.model, token):           # a host embedding's row, copied before the replay
            if self.graph is None and not self._capture():
                return super().__call__(token, pos)
            self.graph.replay()
        return self.static_logits[-1]

    def _forward_static(self) -> torch.Tensor:
        return decode_forward(self.model, self.static_tok, self.static_pos, self.kv, self.executor)

    def _warmup(self, saved: list[torch.Tensor]) -> None:
        """Warm-up forwards on a side stream; the first with torch's sync debug mode set to "error", so a
        host synchronisation inside the step (which would break capture) raises here, harmlessly; the
        recurrent state is put back after each."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for i in range(self.warmup_iters):
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error" if i == 0 else previous)
                try:
                    self._forward_static()
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
                restore_recurrent(self.kv, saved)
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _compile(self, saved: list[torch.Tensor]) -> None:
        """The compiled decode's first forward (if any), outside the sync-debug warm-up and the capture."""
        stages = compiled_stages(self.model)
        if stages is not None:
            stages.warm(self._forward_static)
            restore_recurrent(self.kv, saved)

    def _capture(self) -> bool:
        try:
            with torch.no_grad():
                saved = snapshot_recurrent(self.kv)
                self._compile(saved)
                self._warmup(saved)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.static_logits = self._forward_static()
            self.graph = graph
            return True
        except Exception as exc:  # a capture failure must not kill generation: fall back, loudly
            warnings.warn(f"CUDA graph capture of the decode step failed ({exc!r}); decoding eagerly",
                          RuntimeWarning, stacklevel=3)
            self.failed, self.graph, self.static_logits = True, None, None
            return False


def stage_token(model, token):
    """A host embedding (models/layers.HostEmbedding) gets the decode token's row: copied to its static
    device row now, stream-ordered before the step; the returned context makes T=1 forwards read it (no host
    read inside a graph). A no-op context for a model whose embedding is on the device."""
    emb = staged_embedding(model)
    if emb is None:
        return contextlib.nullcontext()
    emb.stage(int(token))
    return emb.staged()


def before_step(executor) -> None:
    """The executor's `before_step()` hook, right before a decode forward is launched."""
    executor.before_step()
