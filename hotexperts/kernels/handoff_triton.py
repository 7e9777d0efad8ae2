"""Triton kernels of kernels/handoff.py (CUDA): post a layer's misses of T tokens to a pinned host mailbox
row, collect the CPU worker's result. No host synchronisation: CUDA-graph capturable.

Host memory is reached through pinned tensors (UVA: their host address is valid on the device). Ordering:
    post:    one program: every token's row stores and ntok -> fence.acq_rel.sys (every thread) -> barrier
             -> st.relaxed.sys of seq. MULTI (constexpr, T > 1) loops over the T tokens, one compile for
             every T; the T = 1 kernel has no loop (the decode step's kernel as before)
    collect: one program per token: one lane's ld.acquire.sys of done per poll (nanosleep between polls,
             deadline from %globaltimer) -> barrier -> volatile loads of its token's out
The worker side (kernels/csrc/cpu_worker.cpp) pairs them with an acquire load of seq and a release store of
done. No atomics touch host memory (PCIe atomics are not needed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hotexperts.kernels.handoff_codes import ERR_TIMEOUT, GPU_SHARE

_ERR_TIMEOUT = tl.constexpr(ERR_TIMEOUT)


@triton.jit
def _fence_sys():
    tl.inline_asm_elementwise("fence.acq_rel.sys;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _store_sys(ptr, val):
    tl.inline_asm_elementwise("st.relaxed.sys.global.b64 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,l", [ptr, val],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _poll_acquire_sys(ptr):
    """One system-scope acquire load of *ptr per poll (not one per thread: the GPU's polling must not
    flood PCIe and the CPU's memory while the worker computes), broadcast to every thread by a max."""
    lane = tl.arange(0, 32)
    v = tl.inline_asm_elementwise(
        "{\n\t.reg .pred %p;\n\tsetp.ne.s32 %p, $2, 0;\n\tmov.b64 $0, -1;\n\t"
        "@%p ld.acquire.sys.global.b64 $0, [$1];\n\t}",
        "=l,l,r", [ptr + lane * 0, (lane == 0).to(tl.int32)], dtype=tl.int64, is_pure=False, pack=1)
    return tl.max(v, axis=0)


@triton.jit
def _nanosleep():
    tl.inline_asm_elementwise("nanosleep.u32 256;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _now_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _misses(ids_ptr, slot_ptr, k, HAS_SLOTS: tl.constexpr, KB: tl.constexpr, Z: tl.constexpr,
            SHARE: tl.constexpr):
    """-> [KB] ids (-1 padded), [KB] CPU miss ids, [KB] GPU miss ids (-1 elsewhere): a miss has no slot
    (every id when there is no slot table); the first min(Z, misses // SHARE) misses in k order go to
    the GPU (read from host memory), the others to the CPU worker."""
    kk = tl.arange(0, KB)
    e = tl.load(ids_ptr + kk, mask=kk < k, other=-1)
    if HAS_SLOTS:
        s = tl.load(slot_ptr + tl.maximum(e, 0), mask=kk < k, other=0)
        miss = tl.where((e >= 0) & (s < 0), e, -1)
    else:
        miss = e
    if Z > 0:
        is_miss = (miss >= 0).to(tl.int32)
        share = tl.minimum(tl.sum(is_miss, axis=0) // SHARE, Z)
        rank = tl.cumsum(is_miss, axis=0) - 1
        gpu = (miss >= 0) & (rank < share)
        return e, tl.where(gpu, -1, miss), tl.where(gpu, miss, -1)
    return e, miss, tl.full([KB], -1, tl.int64)


@triton.jit
def _post_token(t, x_ptr, ids_ptr, w_ptr, slot_ptr, zc_ptr, mb_ids, mb_miss, mb_zc, mb_w, mb_x, row, k, K, D,
                TM, HAS_SLOTS: tl.constexpr, KB: tl.constexpr, BD: tl.constexpr, EVEN: tl.constexpr,
                Z: tl.constexpr, SHARE: tl.constexpr):
    """Token t's cells (row, t) of the mailbox: ids, CPU / GPU misses, weights (fp32), x."""
    kk = tl.arange(0, KB)
    e, miss, zc = _misses(ids_ptr + t * k, slot_ptr, k, HAS_SLOTS, KB, Z, SHARE)
    w = tl.load(w_ptr + t * k + kk, mask=kk < k, other=0.0).to(tl.float32)
    cell = (row * TM + t) * K
    tl.store(mb_ids + cell + kk, e, mask=kk < K)
    tl.store(mb_miss + cell + kk, miss, mask=kk < K)
    tl.store(mb_zc + cell + kk, zc, mask=kk < K)
    tl.store(mb_w + cell + kk, w, mask=kk < K)
    if Z > 0:
        tl.store(zc_ptr + t * k + kk, zc, mask=kk < k)   # device copy: the GPU's own misses
    xrow = (row * TM + t) * D
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        if EVEN:                                         # unmasked: 16-byte stores over PCIe, not 2-byte
            tl.store(mb_x + xrow + d, tl.load(x_ptr + t * D + d))
        else:
            tl.store(mb_x + xrow + d, tl.load(x_ptr + t * D + d, mask=d < D), mask=d < D)


@triton.jit(do_not_specialize=["r", "T"])
def _post_kernel(x_ptr, ids_ptr, w_ptr, slot_ptr, cnt_ptr, zc_ptr, mb_ids, mb_miss, mb_zc, mb_w, mb_x, mb_seq,
                 mb_ntok, r, T, k, K, D, TM, HAS_SLOTS: tl.constexpr, KB: tl.constexpr, BD: tl.constexpr,
                 EVEN: tl.constexpr, Z: tl.constexpr, SHARE: tl.constexpr, MULTI: tl.constexpr):
    row = r.to(tl.int64)
    if MULTI:                                            # a verify step: T tokens, one kernel for every T
        for t in range(0, T):
            _post_token(t, x_ptr, ids_ptr, w_ptr, slot_ptr, zc_ptr, mb_ids, mb_miss, mb_zc, mb_w, mb_x, row,
                        k, K, D, TM, HAS_SLOTS, KB, BD, EVEN, Z, SHARE)
    else:                                                # a decode step: the one token, no loop
        _post_token(0, x_ptr, ids_ptr, w_ptr, slot_ptr, zc_ptr, mb_ids, mb_miss, mb_zc, mb_w, mb_x, row, k, K,
                    D, TM, HAS_SLOTS, KB, BD, EVEN, Z, SHARE)
    tl.store(mb_ntok + row, T)
    v = tl.load(cnt_ptr + row) + 1
    tl.debug_barrier()                                   # every thread has read the old count
    tl.store(cnt_ptr + row, v)
    _fence_sys()                                         # this thread's row stores reach the host first
    tl.debug_barrier()                                   # ... for every thread, before the flag
    _store_sys(mb_seq + row, v)


@triton.jit
def _row_misses(ids_ptr, slot_ptr, k, T, HAS_SLOTS: tl.constexpr, KB: tl.constexpr, Z: tl.constexpr,
                SHARE: tl.constexpr, MULTI: tl.constexpr):
    """CPU misses over the row's T tokens (post's rule), counted."""
    if MULTI:
        n = tl.full([], 0, tl.int32)
        for t in range(0, T):
            _, miss, _ = _misses(ids_ptr + t * k, slot_ptr, k, HAS_SLOTS, KB, Z, SHARE)
            n += tl.sum((miss >= 0).to(tl.int32), axis=0)
    else:
        _, miss, _ = _misses(ids_ptr, slot_ptr, k, HAS_SLOTS, KB, Z, SHARE)
        n = tl.sum((miss >= 0).to(tl.int32), axis=0)
    return n


@triton.jit(do_not_specialize=["r", "T", "timeout_ns"])
def _collect_kernel(ids_ptr, slot_ptr, cnt_ptr, mb_done, mb_out, mb_err, y_ptr, y2_ptr, out_ptr, r, T, k, D,
                    TM, timeout_ns, HAS_SLOTS: tl.constexpr, HAS_Y: tl.constexpr, HAS_Y2: tl.constexpr,
                    KB: tl.constexpr, BD: tl.constexpr, Z: tl.constexpr, SHARE: tl.constexpr,
                    MULTI: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)                    # this program's token
    n_miss = _row_misses(ids_ptr, slot_ptr, k, T, HAS_SLOTS, KB, Z, SHARE, MULTI)
    row = r.to(tl.int64)
    v = tl.load(cnt_ptr + row)
    failed = tl.load(mb_err, volatile=True) != 0         # an earlier failure: do not wait for a dead worker
    done = tl.where((n_miss > 0) & (~failed), v - 1, v)  # no CPU miss: nothing to wait for
    t0 = _now_ns()
    while (done < v) & (_now_ns() - t0 < timeout_ns):
        _nanosleep()
        done = _poll_acquire_sys(mb_done + row)
    tl.debug_barrier()                                   # the acquiring lane's view, for every thread
    if done < v:
        tl.store(mb_err, _ERR_TIMEOUT)
    use = (n_miss > 0) & (~failed) & (done >= v)
    src, dst = (row * TM + t) * D, t * D
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        acc = tl.zeros([BD], dtype=tl.float32)
        if HAS_Y:
            acc += tl.load(y_ptr + dst + d, mask=d < D, other=0.0).to(tl.float32)
        if HAS_Y2:
            acc += tl.load(y2_ptr + dst + d, mask=d < D, other=0.0).to(tl.float32)
        acc += tl.load(mb_out + src + d, mask=(d < D) & use, other=0.0, volatile=True)
        tl.store(out_ptr + dst + d, acc.to(out_ptr.dtype.element_ty), mask=d < D)


def _shapes(ids: torch.Tensor, K: int, D: int) -> tuple[int, int, int]:
    k = ids.shape[1]
    return k, triton.next_power_of_2(max(k, K)), min(1024, triton.next_power_of_2(D))


def post(r, x, ids, weights, slot_row, counter, mb, gpu_misses: int = 0, share: int = GPU_SHARE):
    T, D = x.shape
    k, KB, BD = _shapes(ids, mb.K, D)
    ids, x, weights = ids.contiguous(), x.contiguous(), weights.contiguous()
    slots = slot_row if slot_row is not None else ids
    zc = torch.full((T, k), -1, dtype=torch.long, device=x.device) if gpu_misses else ids
    _post_kernel[(1,)](x, ids, weights, slots, counter, zc, mb.ids, mb.miss, mb.zc, mb.w, mb.x, mb.seq,
                       mb.ntok, r, T, k, mb.K, D, mb.TM, HAS_SLOTS=slot_row is not None, KB=KB, BD=BD,
                       EVEN=D % BD == 0, Z=gpu_misses, SHARE=share, MULTI=T > 1, num_warps=4)
    return zc if gpu_misses else None


def collect(r, ids, slot_row, counter, mb, y, dtype, timeout_s, y2=None, gpu_misses: int = 0,
            share: int = GPU_SHARE) -> torch.Tensor:
    T, D = ids.shape[0], mb.D
    k, KB, BD = _shapes(ids, mb.K, D)
    ids = ids.contiguous()
    out = torch.empty(T, D, dtype=dtype, device=ids.device)              # [T, D]
    slots = slot_row if slot_row is not None else ids
    timeout_ns = int(timeout_s * 1e9)
    y = y.contiguous() if y is not None else out
    y2 = y2.contiguous() if y2 is not None else out
    _collect_kernel[(T,)](ids, slots, counter, mb.done, mb.out, mb.err, y, y2, out, r, T, k, D, mb.TM,
                          timeout_ns, HAS_SLOTS=slot_row is not None, HAS_Y=y is not out,
                          HAS_Y2=y2 is not out, KB=KB, BD=BD, Z=gpu_misses, SHARE=share, MULTI=T > 1,
                          num_warps=1)
    return out
