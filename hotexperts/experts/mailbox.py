"""Decode-step handoff between the device and a native CPU worker thread, through a host mailbox.

    handoff = DecodeHandoff(store, layers, top_k, hidden, x_dtype, device, max_tokens=16)   # the worker
    zc = handoff.post(layer, x [T,D], ids [T,k], weights [T,k], slot_row, gpu_misses=Z)   # device op:
                                      # misses -> mailbox row; per token the first Z misses stay the GPU's
    y = handoff.collect(layer, ids, slot_row, y_hits, dtype, y_zc, gpu_misses=Z)   # device op: + CPU result
    step = handoff.take_step()        # host, after the step finished: the rows posted since the last call
    handoff.close()

The mailbox rows (Mailbox) are pinned host tensors read and written in place by the device kernels
(kernels/handoff.py) and by the worker (kernels/csrc/cpu_worker.cpp, which runs the fused CPU MoE kernel
with the store's experts): one row per MoE layer, holding the step's T tokens (T = 1 in decode, 2..max_tokens
in a verify step; the worker computes a row's T tokens in one kernel call, reading each missed expert once),
so a step needs no host round trip and no Python between layers, and the step can be one CUDA graph. On
CPU-only machines the same protocol runs with torch ops in place of the kernels (tests, CI).
`DecodeHandoff.self_test()` checks one round trip against a direct kernel call; the executor falls back to
its synchronous path, with a warning, when it fails.
Errors the worker reports (a bad expert id) and device waits that time out raise ExpertComputeError from
take_step(): one clear message instead of a hang or silent wrong output.
"""

from __future__ import annotations

import atexit
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.errors import ExpertComputeError, HotExpertsError
from hotexperts.kernels import cpu_moe as cm
from hotexperts.kernels import handoff as hk
from hotexperts.kernels.cpu_build import load_error, load_extension
from hotexperts.kernels.handoff_codes import ERR_TIMEOUT, GPU_SHARE, LARGE_EXPERT_BYTES, MAX_STEP_TOKENS

TIMEOUT_S = 10.0


class HandoffUnavailable(RuntimeError):
    """The native worker cannot serve this store or device (the reason is the message)."""


class Mailbox:
    """One row per MoE layer, each with room for `tokens` tokens (TM): seq, done, ntok [Lm] int64 (ntok: the
    tokens of the row's latest post); ids, miss, zc [Lm, TM, K] int64; w [Lm, TM, K] fp32; x [Lm, TM, D]
    x_dtype; out [Lm, TM, D] fp32; cpu_ns [Lm] int64; err [1] int64 (see cpu_worker.cpp). A post of T tokens
    writes cells t < T only; the others are stale."""

    def __init__(self, layers: int, top_k: int, hidden: int, x_dtype: torch.dtype, pin: bool,
                 tokens: int = 1):
        self.K, self.D, self.TM = int(top_k), int(hidden), int(tokens)

        def buf(shape, dtype, fill=0):
            try:
                t = torch.empty(shape, dtype=dtype, pin_memory=pin)
            except RuntimeError as e:
                raise HandoffUnavailable(f"cannot pin the decode mailbox ({e})") from e
            return t.fill_(fill)

        cells = (layers, self.TM, top_k)
        self.seq, self.done = buf(layers, torch.long), buf(layers, torch.long)
        self.ntok = buf(layers, torch.long, 1)
        self.ids, self.miss = buf(cells, torch.long, -1), buf(cells, torch.long, -1)
        self.zc = buf(cells, torch.long, -1)
        self.w = buf(cells, torch.float32)
        self.x = buf((layers, self.TM, hidden), x_dtype)
        self.out = buf((layers, self.TM, hidden), torch.float32)
        self.cpu_ns, self.err = buf(layers, torch.long), buf(1, torch.long)


@dataclass
class StepRows:
    """Routing of one step, for the rows (MoE layers) that posted: [n, T, K] ids, CPU misses and GPU misses
    (computed by the GPU from host memory), T = the step's tokens (the most any row posted; cells past a
    row's own count are -1); -1 = none."""

    rows: np.ndarray          # [n] mailbox rows
    ids: np.ndarray           # [n, T, K]
    miss: np.ndarray          # [n, T, K]
    zc: np.ndarray            # [n, T, K]
    cpu_s: np.ndarray         # [n] worker compute seconds since the last take
    ntok: np.ndarray          # [n] tokens each row posted

    @property
    def tokens(self) -> int:
        return int(self.ntok.max()) if self.ntok.size else 1

    @property
    def hits(self) -> np.ndarray:
        return (self.ids >= 0) & (self.miss < 0) & (self.zc < 0)


class CpuExpertWorker:
    """The native thread that serves a Mailbox with the store's experts of `layers` (row order)."""

    def __init__(self, mb: Mailbox, store, layers: list[int], options: KernelOptions, *, idle_ms: float = 5.0,
                 sleep_us: float = 20.0):
        mod = load_extension(options.cpu_isa)
        if mod is None:
            raise HandoffUnavailable(f"the CPU extension is unavailable ({load_error(options.cpu_isa)})")
        keys = ("f13", "q13", "s13", "z13", "f2", "q2", "s2", "z2", "act", "alpha", "limit", "b13")
        cols = {k: [] for k in keys}
        for l in layers:
            le = store.layer(l)
            p13, p2 = cm._parts(le.w13), cm._parts(le.w2)
            if p13 is None or p2 is None or le.w2.shape[1] % 32 or le.w2.shape[-1] % 32:
                raise HandoffUnavailable("the CPU kernel cannot read these experts (format or shape)")
            for key, v in zip(("f13", "q13", "s13", "z13"), p13, strict=True):
                cols[key].append(v)
            for key, v in zip(("f2", "q2", "s2", "z2"), p2, strict=True):
                cols[key].append(v)
            for key, v in zip(("act", "alpha", "limit", "b13"), cm.act_args(le), strict=True):   # variant
                cols[key].append(v)
        self.impl = mod.CpuWorker(mb.seq, mb.done, mb.ntok, mb.miss, mb.w, mb.x, mb.out, mb.cpu_ns, mb.err,
                                  *(cols[k] for k in keys),
                                  options.threads(), options.use_act_quant(), options.prefetch_rows, idle_ms,
                                  sleep_us)

    def wait(self, row: int, value: int, timeout_s: float) -> bool:
        return self.impl.wait(row, value, timeout_s)

    def take_error(self, code: int) -> str:
        """Acknowledge err == code (cleared only if unchanged); the worker's pending message, forgotten."""
        return self.impl.take_error(code)

    def close(self) -> None:
        self.impl.close()


_OPEN: weakref.WeakSet = weakref.WeakSet()     # handoffs whose worker thread may still run


@atexit.register
def _close_all() -> None:
    """Stop every worker thread before interpreter and CUDA teardown (executors can sit in cycles)."""
    for handoff in list(_OPEN):
        handoff.close()


class DecodeHandoff:
    def __init__(self, store, layers: list[int], top_k: int, hidden: int, x_dtype: torch.dtype, device,
                 options: KernelOptions = DEFAULT_KERNELS, max_tokens: int = MAX_STEP_TOKENS):
        self.device, self.options = torch.device(device), options
        self.layers = list(layers)
        self.row = {l: i for i, l in enumerate(self.layers)}
        self.mb = Mailbox(len(self.layers), top_k, hidden, x_dtype, pin=self.device.type == "cuda",
                          tokens=max_tokens)
        self.worker = CpuExpertWorker(self.mb, store, self.layers, options)
        self.counter = torch.zeros(len(self.layers), dtype=torch.long, device=self.device)     # [Lm]
        self._seen = np.zeros(len(self.layers), dtype=np.int64)
        self._cpu_ns = np.zeros(len(self.layers), dtype=np.int64)
        self.store = store
        # the GPU takes one miss per `share` misses of a layer: a small expert read over PCIe is latency-
        # bound (2.95 MB: ~150 us on the H200, slower than the CPU), a large one streams (Mixtral: 88 MB)
        self.share = 2 if store.expert_nbytes >= LARGE_EXPERT_BYTES else GPU_SHARE
        self.closed = False
        _OPEN.add(self)

    # ---- device side (inside the decode step) ----------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return self.mb.TM

    def post(self, layer, x, ids, weights, slot_row, gpu_misses: int = 0) -> torch.Tensor | None:
        """-> ids [T, k] of the misses the GPU computes from host memory (None when gpu_misses == 0)."""
        T, k = ids.shape
        if k > self.mb.K:
            raise HotExpertsError(f"routing top-k {k} exceeds the model's top-k {self.mb.K} "
                                  "(a replayed trace of another model?): the decode mailbox has no room")
        if not 1 <= T <= self.mb.TM:
            raise HotExpertsError(f"a step of {T} tokens does not fit the decode mailbox (1..{self.mb.TM} "
                                  "tokens per step)")
        return hk.post(self.row[layer], x, ids, weights, slot_row, self.counter, self.mb, gpu_misses,
                       self.share)

    def collect(self, layer, ids, slot_row, y, dtype, y2=None, gpu_misses: int = 0) -> torch.Tensor:
        return hk.collect(self.row[layer], ids, slot_row, self.counter, self.mb, y, dtype, TIMEOUT_S,
                          worker=self.worker, y2=y2, gpu_misses=gpu_misses, share=self.share)

    # ---- host side (between steps) ---------------------------------------------------------------------
    def take_step(self) -> StepRows:
        """The rows posted since the last call (the step must have finished on the device)."""
        self.check()
        seq = self.mb.seq.numpy()
        rows = np.flatnonzero(seq != self._seen)
        self._seen[rows] = seq[rows]
        ns = self.mb.cpu_ns.numpy()[rows].copy()
        cpu_s = (ns - self._cpu_ns[rows]) * 1e-9
        self._cpu_ns[rows] = ns
        ntok = self.mb.ntok.numpy()[rows].clip(1, self.mb.TM)
        T = int(ntok.max()) if rows.size else 1
        stale = np.arange(T)[None, :, None] >= ntok[:, None, None]             # [n, T, 1]
        ids, miss, zc = (np.where(stale, -1, t.numpy()[rows, :T]) for t in (self.mb.ids, self.mb.miss,
                                                                             self.mb.zc))
        return StepRows(rows, ids, miss, zc, cpu_s, ntok)

    def check(self) -> None:
        """Raise now if the worker reported an error or a device wait timed out (a cheap host read)."""
        code = int(self.mb.err[0])
        if code == 0:
            return
        msg = self.worker.take_error(code)                # clears err unless a new failure came meanwhile
        if code == ERR_TIMEOUT:
            why = f" (the worker had failed: {msg})" if msg else ""
            raise ExpertComputeError(f"the CPU expert worker did not answer within {TIMEOUT_S:g} s{why} "
                                  "(decode step aborted); rerun with --moe-decode sync to bypass it")
        raise ExpertComputeError(f"CPU expert computation failed: {msg or 'no message'}")

    def self_test(self, x_dtype: torch.dtype) -> None:
        """Round trips on row 0 (every expert a miss) of 1 token, and of 2 when a row holds more, against a
        direct kernel call; raises on mismatch."""
        for T in sorted({1, min(2, self.mb.TM)}):
            got, want = self._round_trip(x_dtype, T)
            if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
                raise HandoffUnavailable(f"the decode mailbox round trip of {T} token(s) gave a wrong result "
                                         f"(max error {float((got - want).abs().max()):.3g})")

    def _round_trip(self, x_dtype: torch.dtype, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the mailbox's result, the kernel's) for T tokens on row 0, each [T, D] fp32."""
        layer, K, D = self.layers[0], self.mb.K, self.mb.D
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, D, generator=g).to(x_dtype)
        ids = (torch.arange(K, dtype=torch.long)[None, :] + torch.arange(T)[:, None]) % self.store.num_experts
        w = torch.full((T, K), 1.0 / K)
        self.post(layer, x.to(self.device), ids.to(self.device), w.to(self.device), None)
        got = self.collect(layer, ids.to(self.device), None, None, torch.float32).cpu()
        self.check()
        self.take_step()
        out = torch.empty(T, D, dtype=torch.float32)
        return got, cm.cpu_moe(x, ids, w.to(x_dtype), self.store.layer(layer), out, options=self.options)

    def close(self) -> None:
        if not self.closed:
            self.worker.close()
            self.closed = True

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
