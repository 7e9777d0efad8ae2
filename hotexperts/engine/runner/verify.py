"""The T-token verify step: T new tokens at positions pos..pos+T-1 against the decode cache, in one forward.

    step = make_verify_step(model, kv, executor, device, use_graph=True)
    logits = step(tokens [T] (list or int64 tensor), pos) -> [T, V] float32, 2 <= T <= MAX_VERIFY_T
    step.graphed_sizes          the T buckets captured as CUDA graphs so far
    step.union                  ExpertUnion: distinct routed experts the verify steps touched (device counter)

The verify step runs the decode path of the model, not the prompt path: the whole static cache (kv_len None),
the additive decode bias with grouped attention (T <= models.layers.SMALL_T), the recurrent gated delta rule
for linear-attention layers (kernels/deltanet: T <= RECURRENT_MAX_T), and the executor of the T=1 step, called
with before_step() first so a hybrid executor accounts it as a decode step over the union of the T tokens'
experts (not as a prompt chunk). The only numerical difference from T single steps is the rounding of GEMMs
whose row blocking depends on T (no stock BLAS is batch invariant: ~1e-6 relative in fp32 on CPU).

CUDA graphs: one graph per T bucket (each T in 2..MAX_VERIFY_T is its own bucket, captured lazily on first
use, sharing one memory pool) when the executor's T > 1 calls have no host synchronisation
(`executor.verify_graph_safe`: GpuExecutor with Triton; a hybrid executor whose native CPU worker runs, the
T tokens' misses going through its mailbox as a decode step's do (experts/worker_decode.py); checked again by
a warm-up under torch's sync debug mode "error"). A hybrid executor without the worker syncs with the host per
layer in T > 1 calls (experts/sync_step.py), so its verify steps run eagerly. MAX_VERIFY_T is the tokens a
mailbox row holds (kernels/handoff_codes.MAX_STEP_TOKENS). A host embedding
(models/layers.HostEmbedding) is gathered on the host and copied into the bucket's static [T, D] input before
the replay; inside the capture the model's embedding returns that buffer. Any capture failure warns once and
the step runs eagerly from then on.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from hotexperts.errors import HotExpertsError
from hotexperts.kernels.handoff_codes import MAX_STEP_TOKENS
from hotexperts.models.cache import restore_recurrent, snapshot_recurrent
from hotexperts.models.transforms import staged_embedding

MAX_VERIFY_T = MAX_STEP_TOKENS


class ExpertUnion:
    """Counts, on the device (no host sync, CUDA-graph safe), the distinct experts each MoE layer call of the
    verify steps routes to: `total` (int64 0-d) summed over calls. `calls`/`steps` are host counters."""

    def __init__(self, num_experts: int, device: torch.device):
        self.E = num_experts
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.cells = 0          # routed (token, k) cells seen, host-side: T * K per layer call
        self.calls = 0          # MoE layer calls counted

    def count(self, ids: torch.Tensor) -> None:
        """ids [T, K] int64 (-1 = no expert) -> total += number of distinct experts among them."""
        flat = torch.where(ids < 0, self.E, ids).flatten()                     # [T*K], -1 -> E
        mark = torch.zeros(self.E + 1, dtype=torch.int64, device=ids.device).index_fill_(0, flat, 1)
        self.total += mark[:self.E].sum()

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside are not counted (a rollback's recompute): the counters are put back after."""
        total, calls, cells = self.total.clone(), self.calls, self.cells
        try:
            yield
        finally:
            self.total.copy_(total)
            self.calls, self.cells = calls, cells

    def per_layer(self) -> float:
        """Mean distinct experts per MoE layer call (reads the device counter: one sync)."""
        return float(self.total.item()) / self.calls if self.calls else 0.0


class _Counting:
    """The executor as the model sees it during a verify step: counts the union, then delegates."""

    def __init__(self, executor, union: ExpertUnion):
        self.executor, self.union = executor, union
        self.counting = True

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.counting:
            self.union.count(ids)
        return self.executor(layer, x, ids, weights)


def check_size(T: int, pos: int, max_seq: int) -> None:
    if not 2 <= T <= MAX_VERIFY_T:
        raise HotExpertsError(f"a verify step takes 2..{MAX_VERIFY_T} tokens, got {T}")
    if pos < 0 or pos + T > max_seq:
        raise HotExpertsError(f"a verify step at positions {pos}..{pos + T - 1} does not fit the cache of "
                              f"{max_seq} positions")


class EagerVerifyStep:
    graphed_sizes: frozenset = frozenset()

    def __init__(self, model, kv, executor, device: torch.device):
        self.model, self.kv, self.executor, self.device = model, kv, executor, torch.device(device)
        self.union = ExpertUnion(model.cfg.num_experts, self.device)
        self.counted = _Counting(executor, self.union)
        self.moe_layers = len(model.cfg.moe_layers)

    def _account(self, T: int) -> None:
        self.union.calls += self.moe_layers
        self.union.cells += self.moe_layers * T * self.model.cfg.top_k

    def __call__(self, tokens, pos: int) -> torch.Tensor:
        tok = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1)     # [T]
        T = tok.shape[0]
        check_size(T, pos, self.kv.max_seq)
        ipos = torch.arange(pos, pos + T, dtype=torch.long, device=self.device)            # [T]
        self.executor.before_step()
        self._account(T)
        with torch.no_grad():
            return self.model(tok, ipos, self.kv, self.counted)                              # [T, V]


class _StaticRows(nn.Module):
    """Stands in for a host embedding inside a capture: returns the bucket's static input rows."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = rows

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rows


@contextlib.contextmanager
def _embedding_replaced(model, rows: torch.Tensor | None):
    if rows is None:
        yield
        return
    original = model.model.embed_tokens
    model.model.embed_tokens = _StaticRows(rows)
    try:
        yield
    finally:
        model.model.embed_tokens = original


class _Bucket:
    """One T bucket's CUDA graph and static buffers (tokens, positions, host-embedding rows, logits)."""

    def __init__(self, step: GraphVerifyStep, T: int):
        dev, D = step.device, step.model.cfg.hidden_size
        self.T = T
        self.tok = torch.zeros(T, dtype=torch.long, device=dev)                             # [T]
        self.pos = torch.zeros(T, dtype=torch.long, device=dev)                             # [T]
        self.rows = None if step.host is None else torch.zeros(T, D, dtype=step.host.weight.dtype, device=dev)
        self.logits: torch.Tensor | None = None                                             # [T, V]
        self.graph: torch.cuda.CUDAGraph | None = None

    def fill(self, step: GraphVerifyStep, tokens, pos: int) -> None:
        host_tok = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()              # [T]
        self.tok.copy_(host_tok)
        self.pos.copy_(torch.arange(pos, pos + self.T))
        if self.rows is not None:
            self.rows.copy_(step.host(host_tok))

    def forward(self, step: GraphVerifyStep) -> torch.Tensor:
        with _embedding_replaced(step.model, self.rows):
            return step.model(self.tok, self.pos, step.kv, step.counted)


class GraphVerifyStep(EagerVerifyStep):
    """A CUDA graph per T bucket, captured on first use with the real tokens and position: the warm-up
    forwards rewrite the same K/V entries the real step writes, and the recurrent state they advance is put
    back before the replay that computes the step."""

    def __init__(self, model, kv, executor, device: torch.device):
        super().__init__(model, kv, executor, device)
        self.host = staged_embedding(model)
        self.buckets: dict[int, _Bucket] = {}
        self.pool = None
        self.failed = False

    @property
    def graphed_sizes(self) -> frozenset:                    # type: ignore[override]
        return frozenset(T for T, b in self.buckets.items() if b.graph is not None)

    def __call__(self, tokens, pos: int) -> torch.Tensor:
        T = len(tokens)
        if self.failed or self.executor.on_route is not None:
            return super().__call__(tokens, pos)
        check_size(T, pos, self.kv.max_seq)
        bucket = self.buckets.get(T)
        if bucket is None:
            bucket = self.buckets[T] = _Bucket(self, T)
        bucket.fill(self, tokens, pos)
        self.executor.before_step()
        if bucket.graph is None and not self._capture(bucket):
            return super().__call__(tokens, pos)
        self._account(T)
        bucket.graph.replay()
        return bucket.logits

    def _warm(self, bucket: _Bucket, saved: list[torch.Tensor]) -> None:
        """Two warm-up forwards on a side stream, the first under sync debug mode "error" (a host sync
        inside raises here, harmlessly); the recurrent state is restored after each."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for mode in ("error", None):
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode(mode or previous)
                try:
                    bucket.forward(self)
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
                restore_recurrent(self.kv, saved)
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _capture(self, bucket: _Bucket) -> bool:
        self.counted.counting = False                        # warm-up forwards are not verify steps
        try:
            with torch.no_grad():
                self._warm(bucket, snapshot_recurrent(self.kv))
                self.counted.counting = True
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    bucket.logits = bucket.forward(self)
                self.pool = graph.pool()
            bucket.graph = graph
            return True
        except Exception as exc:  # a capture failure must not kill generation: fall back, loudly
            warnings.warn(f"CUDA graph capture of the {bucket.T}-token verify step failed ({exc!r}); "
                          f"verifying eagerly", RuntimeWarning, stacklevel=3)
            self.failed, bucket.graph, bucket.logits = True, None, None
            return False
        finally:
            self.counted.counting = True


def make_verify_step(model, kv, executor, device: torch.device | str, *, use_graph: bool = True):
    """GraphVerifyStep on CUDA when the executor's T > 1 calls are sync-free (`verify_graph_safe`) and
    use_graph, else EagerVerifyStep."""
    device = torch.device(device)
    if use_graph and device.type == "cuda" and executor.verify_graph_safe is True:
        return GraphVerifyStep(model, kv, executor, device)
    return EagerVerifyStep(model, kv, executor, device)
