"""Device-side handoff of a decode layer's CPU experts: post the misses to a host mailbox, later collect the
CPU's result, without any host synchronisation (so a whole decode step can be one CUDA graph).

Per MoE layer row r of a mailbox `mb` (experts/mailbox.py; pinned host tensors the GPU reads and writes
in place, K = mailbox top-k >= the call's k, D = hidden size):

    post(r, x [1, D], ids [1, k], weights [1, k], slot_row [E] int32 | None, counter [Lm] int64, mb)
        miss = ids where the expert has no slot (slot_row[id] < 0; every id when slot_row is None), else -1
        mb.ids[r] = ids, mb.miss[r] = miss, mb.w[r] = weights (fp32), mb.x[r] = x   (cells >= k: -1 / 0)
        counter[r] += 1; then, after those writes are visible to the host: mb.seq[r] = counter[r]
    collect(r, ids, slot_row, counter, mb, y [1, D] fp32 | None, dtype, timeout_s) -> [1, D] dtype
        if the row has a miss: wait until mb.done[r] >= counter[r] (the CPU worker computed the row), then
        return (y + mb.out[r]) in dtype (y None: mb.out[r] alone); with no miss: y (the worker is not waited)
        A wait over timeout_s sets mb.err[0] = ERR_TIMEOUT and returns the partial sum (the host raises).

CUDA tensors use two one-program Triton kernels: stores to host memory, a system-scope fence and a barrier,
then the flag (PTX `fence.acq_rel.sys`, `st.relaxed.sys`); the wait spins on `ld.acquire.sys` with a
%globaltimer deadline. CPU tensors (tests, CI) use torch ops and the worker's own `wait` (GIL released).
`counter` lives on the compute device, so its increments replay with a CUDA graph.
"""

from __future__ import annotations

import torch

ERR_TIMEOUT = 2
_TRITON = None          # the compiled kernels module, False when triton is unavailable


def _kernels():
    global _TRITON
    if _TRITON is None:
        try:
            from hotexperts.kernels import handoff_triton
            _TRITON = handoff_triton
        except Exception:  # noqa: BLE001 - no triton means no device handoff
            _TRITON = False
    return _TRITON or None


def device_handoff_available() -> bool:
    """True when CUDA tensors can use the Triton handoff kernels."""
    return torch.cuda.is_available() and _kernels() is not None


def post(r: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, slot_row: torch.Tensor | None,
         counter: torch.Tensor, mb) -> None:
    if x.is_cuda:
        _kernels().post(r, x, ids, weights, slot_row, counter, mb)
        return
    k = ids.shape[1]
    e = ids[0]                                                          # [k]
    miss = e if slot_row is None else torch.where((e >= 0) & (slot_row[e.clamp(min=0)] < 0), e, -1)
    mb.ids[r].fill_(-1)
    mb.ids[r, :k] = e
    mb.miss[r].fill_(-1)
    mb.miss[r, :k] = miss
    mb.w[r].zero_()
    mb.w[r, :k] = weights[0].float()
    mb.x[r] = x[0]
    counter[r] += 1
    mb.seq[r] = counter[r]                                              # last: publishes the row


def collect(r: int, ids: torch.Tensor, slot_row: torch.Tensor | None, counter: torch.Tensor, mb,
            y: torch.Tensor | None, dtype: torch.dtype, timeout_s: float = 10.0, worker=None) -> torch.Tensor:
    if ids.is_cuda:
        return _kernels().collect(r, ids, slot_row, counter, mb, y, dtype, timeout_s)
    e = ids[0]
    missing = (e >= 0) if slot_row is None else (e >= 0) & (slot_row[e.clamp(min=0)] < 0)
    if not bool(missing.any()):
        return (y if y is not None else torch.zeros(1, mb.out.shape[1])).to(dtype)
    if not worker.wait(r, int(counter[r]), timeout_s):
        mb.err[0] = ERR_TIMEOUT
        return (y if y is not None else torch.zeros(1, mb.out.shape[1])).to(dtype)
    out = mb.out[r:r + 1]                                               # [1, D] fp32
    return (out if y is None else y.float() + out).to(dtype)
