"""Copy chosen experts of a pinned host tensor into a device tensor at the same index, in ONE launch: the
GPU reads host memory over PCIe itself (UVA: a pinned tensor's address is valid on the device).

    gather_experts(dst [E, ...] CUDA, src [E, ...] pinned CPU (same shape and dtype), idx [n] int64 CUDA)
        dst[idx[i]] = src[idx[i]] for every i; other rows of dst are left alone.

Why: a prompt chunk streams each layer's non-resident experts into a staging pool. With a cache holding
most experts they are scattered, and one cudaMemcpyAsync per run of consecutive experts and weight part
cost ~150 copies per layer (7,230 per Qwen3-30B-A3B pp512 forward, run 14), each ~15 µs of host work: the
host, not PCIe, bounded the prompt. Grid (n, cdiv(words per expert, BLOCK)); 8-byte words when the row
allows, else 4-byte or 1-byte ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024                      # words per program


@triton.jit
def _gather_kernel(src_ptr, dst_ptr, idx_ptr, row_words, BLOCK: tl.constexpr):
    e = tl.load(idx_ptr + tl.program_id(0)).to(tl.int64)
    off = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = off < row_words
    v = tl.load(src_ptr + e * row_words + off, mask=m)
    tl.store(dst_ptr + e * row_words + off, v, mask=m)


def _words(t: torch.Tensor) -> torch.Tensor:
    """[E, ...] contiguous -> [E, W] view in the widest word (at most int64) that divides a row."""
    rows = t.reshape(t.shape[0], -1).view(torch.uint8)
    nbytes = rows.shape[1]
    for dt, size in ((torch.int64, 8), (torch.int32, 4)):
        if nbytes % size == 0:
            return rows.view(dt)
    return rows


def gather_experts(dst: torch.Tensor, src: torch.Tensor, idx: torch.Tensor) -> None:
    """See module docstring. Queued on the current stream; no host synchronisation."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"gather_experts: dst {tuple(dst.shape)} {dst.dtype} != src {tuple(src.shape)} "
                         f"{src.dtype}")
    if not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("gather_experts: dst and src must be contiguous")
    n = idx.numel()
    if n == 0 or dst.numel() == 0:
        return
    d, s = _words(dst), _words(src)
    W = d.shape[1]
    _gather_kernel[(n, triton.cdiv(W, BLOCK))](s, d, idx, W, BLOCK=BLOCK, num_warps=4)
