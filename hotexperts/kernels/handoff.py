"""Device-side handoff of a decode layer's CPU experts: post the misses to a host mailbox, later collect the
CPU's result, without any host synchronisation (so a whole decode step can be one CUDA graph).

Per MoE layer row r of a mailbox `mb` (experts/mailbox.py; pinned host tensors the GPU reads and writes
in place, K = mailbox top-k >= the call's k, D = hidden size):

    post(r, x [1, D], ids [1, k], weights [1, k], slot_row [E] int32 | None, counter [Lm] int64, mb,
         gpu_misses=Z) -> zc [1, k] | None
        a miss = an id whose expert has no slot (slot_row[id] < 0; every id when slot_row is None); the first
        min(Z, misses // share) misses in k order are the GPU's own (zc: it reads them from host
        memory), the rest the CPU's (miss)
        mb.ids[r] = ids, mb.miss[r] = miss, mb.zc[r] = zc, mb.w[r] = weights (fp32), mb.x[r] = x
        (cells >= k: -1 / 0); counter[r] += 1; then, once those writes are visible to the host:
        mb.seq[r] = counter[r]
    collect(r, ids, slot_row, counter, mb, y, dtype, timeout_s, y2, gpu_misses=Z) -> [1, D] dtype
        y, y2 [1, D] fp32 | None: the GPU's partial sums. If the row has a CPU miss: wait until
        mb.done[r] >= counter[r] (the worker computed the row); return y + y2 + mb.out[r] (absent parts 0).
        A wait over timeout_s sets mb.err[0] = ERR_TIMEOUT and returns the GPU's part (the host raises).

CUDA tensors use two one-program Triton kernels: stores to host memory, a system-scope fence and a barrier,
then the flag (PTX `fence.acq_rel.sys`, `st.relaxed.sys`); the wait spins on `ld.acquire.sys` with a
%globaltimer deadline. CPU tensors (tests, CI) use torch ops and the worker's own `wait` (GIL released).
`counter` lives on the compute device, so its increments replay with a CUDA graph.
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
    """ids [1, k] -> (CPU miss ids [k], GPU miss ids [k]), -1 elsewhere: the torch form of the kernels'
    rule (a miss has no slot; the first min(gpu_misses, misses // share) misses in k order go to the
    GPU: reading an expert over PCIe is slower than the CPU computing it, so the GPU only helps a CPU that
    has several)."""
    e = ids[0]
    miss = e if slot_row is None else torch.where((e >= 0) & (slot_row[e.clamp(min=0)] < 0), e, -1)
    if not gpu_misses:
        return miss, torch.full_like(miss, -1)
    is_miss = miss >= 0
    n_gpu = min(gpu_misses, int(is_miss.sum()) // share)
    gpu = is_miss & (torch.cumsum(is_miss.long(), 0) <= n_gpu)
    return torch.where(gpu, -1, miss), torch.where(gpu, miss, -1)


def post(r: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, slot_row: torch.Tensor | None,
         counter: torch.Tensor, mb, gpu_misses: int = 0, share: int = GPU_SHARE) -> torch.Tensor | None:
    """-> [1, k] ids of the misses the GPU computes itself (-1 elsewhere), or None when gpu_misses == 0."""
    if x.is_cuda:
        return _kernels().post(r, x, ids, weights, slot_row, counter, mb, gpu_misses, share)
    k = ids.shape[1]
    miss, zc = split_misses(ids, slot_row, gpu_misses, share)
    for buf, row in ((mb.ids, ids[0]), (mb.miss, miss), (mb.zc, zc)):
        buf[r].fill_(-1)
        buf[r, :k] = row
    mb.w[r].zero_()
    mb.w[r, :k] = weights[0].float()
    mb.x[r] = x[0]
    counter[r] += 1
    mb.seq[r] = counter[r]                                              # last: publishes the row
    return zc.reshape(1, k) if gpu_misses else None


def collect(r: int, ids: torch.Tensor, slot_row: torch.Tensor | None, counter: torch.Tensor, mb,
            y: torch.Tensor | None, dtype: torch.dtype, timeout_s: float = 10.0, worker=None,
            y2: torch.Tensor | None = None, gpu_misses: int = 0, share: int = GPU_SHARE) -> torch.Tensor:
    """y, y2: the GPU's fp32 partial sums (slot hits; misses it read from host memory), or None."""
    if ids.is_cuda:
        return _kernels().collect(r, ids, slot_row, counter, mb, y, dtype, timeout_s, y2, gpu_misses, share)
    acc = torch.zeros(1, mb.out.shape[1])
    for part in (y, y2):
        if part is not None:
            acc = acc + part.float()
    miss, _ = split_misses(ids, slot_row, gpu_misses, share)
    if not bool((miss >= 0).any()) or int(mb.err[0]) != 0:   # no CPU miss, or a failed worker: no wait
        return acc.to(dtype)
    if not worker.wait(r, int(counter[r]), timeout_s):
        mb.err[0] = ERR_TIMEOUT
        return acc.to(dtype)
    return (acc + mb.out[r:r + 1]).to(dtype)
