"""`hotexperts calibrate [--out profile.json]`: measure this machine into a cost-model hardware profile.

Measured (medians of a few repeats, torch):
    cpu_read_gbs        sum over a large float32 tensor (bytes read / s)
    cpu_expert_gbs      per expert format (bf16, int8, int4): one MoE layer's routed experts for one token
                        through hotexperts.kernels.cpu_moe (torch matmuls when it is not importable), over a
                        stack of experts larger than the last-level cache; weight bytes read / s
    cpu_tflops          bf16 matmul of a prompt-sized batch
  with CUDA:
    h2d_gbs             pinned host -> device copy of --h2d-mib
    sync_s              per-layer round trip: D2H of ids + activations to pinned memory, sync, H2D back
    gpu_hbm_gbs         device-to-device copy (read + write counted)
    gpu_tflops          bf16 matmul 4096^3
    gpu_layer_overhead_s  10 tiny kernel launches (a decoder layer's fixed launches, without CUDA graphs)
Figures not measurable here (no CUDA) are kept from --base (a built-in profile) and listed in `notes`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from hotexperts.trace.profiles import BUILTIN, HardwareProfile, save_hardware


def _median_s(fn, repeats: int = 5, sync=None) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_read_gbs(mib: int) -> float:
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    return x.numel() * 4 / _median_s(lambda: x.sum()) / 1e9


def _experts(fmt: str, num: int, d: int, inter: int):
    from hotexperts.experts.weights import LayerExperts
    w13 = torch.randn(num, 2 * inter, d, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(num, d, inter, dtype=torch.bfloat16) * 0.02
    layer = LayerExperts(w13, w2)
    if fmt == "bf16":
        return layer
    from hotexperts.experts.quant import quantize_layer
    return quantize_layer(layer, {"int8": "int8", "int4": "int4g32"}[fmt])


def _nbytes(w) -> int:
    return w.nbytes if hasattr(w, "fmt") else w.numel() * w.element_size()


def cpu_expert_gbs(fmt: str, mib: int, d: int = 2048, inter: int = 768, k: int = 8) -> float:
    """Weight bytes / s of one token's K routed experts, over a stack of experts of about `mib` MiB."""
    from hotexperts.kernels.cpu_moe import cpu_moe
    per = 3 * d * inter * {"bf16": 2, "int8": 1, "int4": 0.5}[fmt]
    num = max(k, int(mib * 2**20 // per))
    layer = _experts(fmt, num, d, inter)
    x = torch.randn(1, d, dtype=torch.bfloat16)
    w = torch.full((1, k), 1.0 / k, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randperm(num, generator=gen)[:k].view(1, k) for _ in range(8)]
    out = torch.empty(1, d, dtype=torch.bfloat16)
    it = iter(range(1 << 30))

    def step():
        cpu_moe(x, draws[next(it) % len(draws)], w, layer, out)

    per_expert = (_nbytes(layer.w13) + _nbytes(layer.w2)) / num
    return k * per_expert / _median_s(step, repeats=15) / 1e9


def cpu_tflops(n: int = 512, d: int = 2048) -> float:
    """Best of bf16 (fast with AMX / AVX-512 BF16) and fp32 (fast elsewhere) matmul throughput."""
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, d, dtype=dtype), torch.randn(d, d, dtype=dtype)
        best = max(best, 2 * n * d * d / _median_s(lambda a=a, b=b: a @ b, repeats=3) / 1e12)
    return best


def cuda_figures(h2d_mib: int) -> dict:
    dev, sync = torch.device("cuda"), torch.cuda.synchronize
    host = torch.empty(h2d_mib * 2**20, dtype=torch.uint8).pin_memory()
    gpu = torch.empty_like(host, device=dev)
    h2d = host.numel() / _median_s(lambda: gpu.copy_(host, non_blocking=True), sync=sync) / 1e9
    hbm = 2 * gpu.numel() / _median_s(lambda: gpu.clone(), sync=sync) / 1e9
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=dev)
    tflops = 2 * 4096**3 / _median_s(lambda: a @ a, sync=sync) / 1e12
    x = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
    ids = torch.zeros(1, 8, dtype=torch.int64, device=dev)
    px, pids = x.cpu().pin_memory(), ids.cpu().pin_memory()

    def round_trip():
        px.copy_(x, non_blocking=True)
        pids.copy_(ids, non_blocking=True)
        sync()
        x.copy_(px, non_blocking=True)
        x.add_(1)

    sync_s = _median_s(round_trip, repeats=50, sync=sync)
    small = torch.zeros(16, device=dev)
    launch = _median_s(lambda: [small.add_(1) for _ in range(100)], sync=sync) / 100
    vram = torch.cuda.get_device_properties(dev).total_memory / 1e9
    return dict(h2d_gbs=h2d, gpu_hbm_gbs=hbm, gpu_tflops=tflops, sync_s=sync_s,
                gpu_layer_overhead_s=10 * launch, gpu_moe_launch_s=2 * launch, vram_gb=vram)


def measure(base: str = "h200", mib: int = 1024, h2d_mib: int = 256, formats=("bf16", "int8", "int4"),
            matmul: int = 512, log=print) -> HardwareProfile:
    hw = BUILTIN[base]
    figures: dict = {"cpu_read_gbs": cpu_read_gbs(mib)}
    log(f"cpu read: {figures['cpu_read_gbs']:.1f} GB/s")
    experts, notes = dict(hw.cpu_expert_gbs), []
    for fmt in formats:
        try:
            experts[fmt] = cpu_expert_gbs(fmt, mib)
            log(f"cpu experts {fmt}: {experts[fmt]:.1f} GB/s")
        except Exception as e:          # a format the kernels cannot run here keeps the base figure
            notes.append(f"cpu {fmt} kept from {base}: {type(e).__name__}: {e}")
    figures["cpu_expert_gbs"] = experts
    figures["cpu_tflops"] = cpu_tflops(matmul, 4 * matmul)
    if torch.cuda.is_available():
        figures |= cuda_figures(h2d_mib)
        log(f"h2d {figures['h2d_gbs']:.1f} GB/s, sync {figures['sync_s'] * 1e6:.0f} us, "
            f"hbm {figures['gpu_hbm_gbs']:.0f} GB/s")
    else:
        notes.append(f"no CUDA: GPU, PCIe and sync figures kept from {base}")
    return replace(hw, name=f"calibrated-{time.strftime('%Y%m%d')}", label="calibrated",
                   notes="; ".join(notes), **figures)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="measure this machine into a hardware profile JSON",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="hardware-profile.json", help="profile JSON to write")
    p.add_argument("--base", default="h200", choices=sorted(BUILTIN), help="profile for unmeasured figures")
    p.add_argument("--size-mib", type=int, default=1024, help="host memory per CPU measurement")
    p.add_argument("--h2d-mib", type=int, default=256, help="bytes per H2D measurement (CUDA)")
    p.set_defaults(func=run)


def run(args) -> int:
    hw = measure(args.base, args.size_mib, args.h2d_mib)
    doc = save_hardware(args.out, hw)
    print(f"wrote {doc} ({hw.label}; base {args.base})")
    return 0
