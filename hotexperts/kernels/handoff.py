"""Device-side handoff of a step's CPU experts: post the misses to a host mailbox, later collect the CPU's
result, without any host synchronisation (so a whole decode or verify step can be one CUDA graph).

Per MoE layer row r of a mailbox `mb` (experts/mailbox.py; pinned host tensors the GPU reads and writes
in place, TM = tokens a row holds, K = mailbox top-k >= the call's k, D = hidden size), for a step of T
tokens (1 <= T <= TM: a decode step's 1, a verify step's 2..TM):

    post(r, x [T, D], ids [T, k], weights [T, k], slot_row [E] int32 | None, counter [Lm] int64, mb,
         gpu_misses=Z) -> zc [T, k] | None
        a miss = an id whose expert has no slot (slot_row[id] < 0; every id when slot_row is None); per
        token, the first min(Z, its misses // share) misses in k order are the GPU's own (zc: it reads them
        from host memory), the rest the CPU's (miss)
        mb.ids[r, :T] = ids, mb.miss[r, :T] = miss, mb.zc[r, :T] = zc, mb.w[r, :T] = weights (fp32),
        mb.x[r, :T] = x (cells >= k: -1 / 0), mb.ntok[r] = T; counter[r] += 1; then, once those writes are
        visible to the host: mb.seq[r] = counter[r]
    collect(r, ids, slot_row, counter, mb, y, dtype, timeout_s, y2, gpu_misses=Z) -> [T, D] dtype
        y, y2 [T, D] fp32 | None: the GPU's partial sums. If any token of the row has a CPU miss: wait until
        mb.done[r] >= counter[r] (the worker computed the row); return y + y2 + mb.out[r, :T] (absent parts
        0). A wait over timeout_s sets mb.err[0] = ERR_TIMEOUT and returns the GPU's part (the host raises).

CUDA tensors use two Triton kernels: post is one program (stores to host memory, a system-scope fence and a
barrier, then the flag: PTX `fence.acq_rel.sys`, `st.relaxed.sys`; one compile for T = 1, the decode step's
kernel as before, one for every T > 1); collect is one program per token, each waiting with `ld.acquire.sys`
polls and a %globaltimer deadline, then reading its token's row. CPU tensors (tests, CI) use torch ops and the
worker's own `wait` (GIL released). `counter` lives on the compute device, so its increments replay with a
CUDA graph.
"""

from __future__ import annotations

import torch

from hotexperts.kernels.handoff_codes import ERR_TIMEOUT, GPU_SHARE
from hotexperts.kernels.optional import triton_module


def _kernels():
    """handoff_triton, or None without Triton (no device handoff then)."""
    return triton_module("handoff_triton")


def device_handoff_available() -> bool:
    """True when CUDA tensors can use the Triton handoff kernels: an NVIDIA GPU of compute capability 7.0 or
    later (the PTX they use: nanosleep, acquire / release at system scope), not ROCm, and Triton."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability() >= (7, 0) and _kernels() is not None


def split_misses(ids: torch.Tensor, slot_row: torch.Tensor | None, gpu_misses: int, share: int = GPU_SHARE):
    """ids [T, k] -> (CPU miss ids [T, k], GPU miss ids [T, k]), -1 elsewhere: the torch form of the kernels'
    rule (a miss has no slot; per token, the first min(gpu_misses, its misses // share) misses in k order go
    to the GPU: reading an expert over PCIe is slower than the CPU computing it, so the GPU only helps a CPU
    that has several)."""
    miss = ids if slot_row is None else torch.where((ids >= 0) & (slot_row[ids.clamp(min=0)] < 0), ids, -1)
    if not gpu_misses:
        return miss, torch.full_like(miss, -1)
    is_miss = miss >= 0
    n_gpu = (is_miss.sum(1, keepdim=True) // share).clamp(max=gpu_misses)           # [T, 1]
    gpu = is_miss & (torch.cumsum(is_miss.long(), 1) <= n_gpu)
    return torch.where(gpu, -1, miss), torch.where(gpu, miss, -1)


def post(r: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, slot_row: torch.Tensor | None,
         counter: torch.Tensor, mb, gpu_misses: int = 0, share: int = GPU_SHARE) -> torch.Tensor | None:
    """-> [T, k] ids of the misses the GPU computes itself (-1 elsewhere), or None when gpu_misses == 0."""
    if x.is_cuda:
        return _kernels().post(r, x, ids, weights, slot_row, counter, mb, gpu_misses, share)
    T, k = ids.shape
    miss, zc = split_misses(ids, slot_row, gpu_misses, share)
    for buf, cells in ((mb.ids, ids), (mb.miss, miss), (mb.zc, zc)):
        buf[r, :T].fill_(-1)
        buf[r, :T, :k] = cells
    mb.w[r, :T].zero_()
    mb.w[r, :T, :k] = weights.float()
    mb.x[r, :T] = x
    mb.ntok[r] = T
    counter[r] += 1
    mb.seq[r] = counter[r]                                              # last: publishes the row
    return zc if gpu_misses else None


def collect(r: int, ids: torch.Tensor, slot_row: torch.Tensor | None, counter: torch.Tensor, mb,
            y: torch.Tensor | None, dtype: torch.dtype, timeout_s: float = 10.0, worker=None,
            y2: torch.Tensor | None = None, gpu_misses: int = 0, share: int = GPU_SHARE) -> torch.Tensor:
    """y, y2: the GPU's fp32 partial sums [T, D] (slot hits; misses it read from host memory), or None."""
    if ids.is_cuda:
        return _kernels().collect(r, ids, slot_row, counter, mb, y, dtype, timeout_s, y2, gpu_misses, share)
    T = ids.shape[0]
    acc = torch.zeros(T, mb.D)
    for part in (y, y2):
        if part is not None:
            acc = acc + part.float()
    miss, _ = split_misses(ids, slot_row, gpu_misses, share)
    if not bool((miss >= 0).any()) or int(mb.err[0]) != 0:   # no CPU miss, or a failed worker: no wait
        return acc.to(dtype)
    if not worker.wait(r, int(counter[r]), timeout_s):
        mb.err[0] = ERR_TIMEOUT
        return acc.to(dtype)
    return (acc + mb.out[r, :T]).to(dtype)
