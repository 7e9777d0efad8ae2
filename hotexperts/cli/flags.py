"""The flags every model-loading command shares (generate, serve, bench, trace), parsed in one place.

    add_model_arguments(parser, required=True)   --model/-m, --dtype, --device, --max-context/-c,
                                                 --no-cuda-graph, --piecewise-graph, --compile, and the
                                                 llama.cpp habits -ngl, -fa, --no-mmap, --mlock (accepted
                                                 where they mean what they mean here, else one clear error)
    add_placement_arguments(parser)              where experts live (llama.cpp meanings) and the cache knobs
    add_kernel_arguments(parser)                 -t/--threads and the kernel backends
    placement_from_args(args) -> Placement       the flags as one request in the placement grammar
                                                 (experts/placement.py): --placement TEXT is the grammar
                                                 itself; --cpu-moe, --n-cpu-moe, --moe-hot-k, --moe-cache,
                                                 --moe-profile and --vram-budget alone are sugar for it
    kernel_options_from_args(args) -> KernelOptions
    load_engine(args) -> Engine                  the model, placement and kernels these flags name

Contradictory flags raise PlacementError (the CLI prints `error: ...`, exit 2).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from hotexperts.config import GPU_MOE_BACKENDS, STAGE_COPY_MODES, KernelOptions
from hotexperts.engine.engine import DENSE_QUANT, Engine
from hotexperts.engine.load import DTYPES
from hotexperts.errors import PlacementError
from hotexperts.experts.budget import parse_bytes, parse_cache
from hotexperts.experts.placement import DECODE, Placement

POLICY_CHOICES = ("lru", "window-lfu", "decay", "static", "auto")
EXPERT_QUANTS = ("none", "int8", "int4", "int8g", "q4_k")


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-m", "--model", required=required,
                   help="model directory (Hugging Face layout), a .gguf file, or preset:NAME")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("-c", "--max-context", "--ctx-size", dest="max_context", type=int, default=None,
                   help="KV cache length (default: <= 4096)")
    p.add_argument("--dense-quant", choices=DENSE_QUANT, default="auto",
                   help="dense projections: auto keeps a GGUF's quantized ones (Q8_0 & co., exact) and float "
                        "ones as they are; q8 quantizes float ones to int8 per 32 (Q8_0 layout, not exact); "
                        "none dequantizes all to --dtype")
    p.add_argument("--embedding-on-gpu", action="store_true",
                   help="keep the token embedding in VRAM (default on CUDA: in host memory, rows per step)")
    p.add_argument("--no-cuda-graph", action="store_true", help="never capture the decode step")
    p.add_argument("--piecewise-graph", action="store_true",
                   help="experimental: CUDA graphs around the hybrid cache's per-layer host work")
    add_compile_argument(p)
    add_llama_compat_arguments(p)


def add_llama_compat_arguments(p: argparse.ArgumentParser) -> None:
    """llama.cpp flags a user types from habit, accepted where hotexperts does the same thing anyway."""
    g = p.add_argument_group("llama.cpp compatibility (accepted; see each for what it means here)")
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", default=None, metavar="N",
                   help="llama.cpp's dense layers on the GPU: here every dense layer is on the GPU whenever "
                        "one is used, so any N >= the model's layers (99, all, auto) is accepted; experts "
                        "are placed by --cpu-moe / --n-cpu-moe / --moe-cache")
    g.add_argument("-fa", "--flash-attn", dest="flash_attn", nargs="?", const="on", default=None,
                   metavar="on|off|auto",
                   help="accepted: attention always runs torch's fused scaled-dot-product kernels (flash "
                        "where the GPU has them); 'off' is refused")
    g.add_argument("--no-mmap", action="store_true",
                   help="accepted: experts are always read into (pinned) RAM, never served from a mapping")
    g.add_argument("--mlock", action="store_true", help="accepted: pinned host memory is never swapped out")


FLASH_ATTN = ("on", "off", "auto", "1", "0", "true", "false")


def check_llama_compat(args: argparse.Namespace, num_layers: int | None = None) -> None:
    """PlacementError for a llama.cpp flag whose value asks for something hotexperts does not do."""
    fa = getattr(args, "flash_attn", None)
    if fa is not None and str(fa).lower() not in FLASH_ATTN:
        raise PlacementError(f"-fa/--flash-attn: expected on, off or auto, got {fa!r}")
    if fa is not None and str(fa).lower() in ("off", "0", "false"):
        raise PlacementError("-fa off: hotexperts has no non-fused attention path; leave -fa out")
    ngl = getattr(args, "n_gpu_layers", None)
    if ngl is None or str(ngl).lower() in ("all", "auto"):
        return
    n = _int(str(ngl), "-ngl/--n-gpu-layers")
    if n < 0:
        return                                         # llama.cpp: -1 = all
    if n == 0:
        raise PlacementError("-ngl 0: for a CPU-only run use --device cpu; with a GPU every dense layer "
                             "is on it (place experts with --cpu-moe / --n-cpu-moe N)")
    if num_layers is not None and n < num_layers:
        raise PlacementError(f"-ngl {n}: hotexperts keeps all {num_layers} dense layers on the GPU "
                             f"(they are small); to keep VRAM, move experts: --n-cpu-moe or --moe-cache")


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    """--compile (generate, bench, serve): torch.compile the T=1 decode step's dense part."""
    p.add_argument("--compile", action="store_true",
                   help="torch.compile (Inductor) the decode step's norms, attention and router into fewer "
                        "kernels; compiles on the first token (seconds to minutes, cached on disk)")


def add_kernel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kernels")
    g.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="CPU threads of the expert kernel (default: physical cores, one fewer beside a GPU)")
    g.add_argument("--cpu-exact", action="store_true",
                   help="CPU experts in exact fp32 (no int8 activations on the integer path)")
    g.add_argument("--gpu-moe-backend", choices=GPU_MOE_BACKENDS, default="auto",
                   help="GPU expert kernels: Triton where it applies (auto), or force one")
    g.add_argument("--stage-copy", choices=STAGE_COPY_MODES, default="auto",
                   help="prompt staging copies: cudaMemcpyAsync per run (memcpy) or one GPU gather")


def kernel_options_from_args(args: argparse.Namespace) -> KernelOptions:
    return KernelOptions(cpu_threads=args.threads, act_quant=False if args.cpu_exact else None,
                         gpu_moe=args.gpu_moe_backend, stage_copy=args.stage_copy)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("expert placement")
    g.add_argument("--placement", default=None, metavar="TEXT",
                   help="where experts live, in the placement grammar: gpu | cpu | layers:N | hot:K | "
                        "cache:SIZE[:POLICY] | static:FILE | RANGE=WHERE,... (e.g. 0-11=cpu,12-47=gpu)")
    g.add_argument("--experts", choices=("gpu", "cpu"), default=None,
                   help="all routed experts on the GPU / the CPU")
    g.add_argument("--cpu-moe", action="store_true", help="all routed experts on the CPU")
    g.add_argument("--n-cpu-moe", "-ncmoe", default=None, metavar="N|auto",
                   help="experts of the first N MoE layers on the CPU (auto: the smallest N that fits)")
    g.add_argument("--moe-hot-k", type=int, default=None, metavar="K", help="K GPU slots per MoE layer")
    g.add_argument("--moe-window", type=int, default=None, metavar="W", help="routing counted over W tokens")
    g.add_argument("--moe-rebalance-interval", type=int, default=None, metavar="R",
                   help="rebalance every R generated tokens")
    g.add_argument("--moe-pp-bypass", type=int, default=64, metavar="T",
                   help="prompt batches over T tokens bypass the cache (default 64)")
    g.add_argument("--moe-cache", default=None, metavar="BUDGET",
                   help="one slot budget for all layers: GiB ('8GiB', '8'), slots ('2000slots') or auto")
    g.add_argument("--moe-policy", default=None, choices=POLICY_CHOICES)
    g.add_argument("--moe-profile", default=None, metavar="FILE",
                   help="routing profile: static placement alone, warm start with --moe-hot-k/--moe-cache")
    g.add_argument("--moe-max-swaps", type=int, default=4, metavar="N", help="expert copies per step (4)")
    g.add_argument("--vram-budget", default=None, metavar="GiB|auto",
                   help="the process's whole GPU memory, CUDA context included (context + dense + KV + "
                        "workspace + staging + slots)")
    g.add_argument("--expert-quant", default="none", choices=EXPERT_QUANTS,
                   help="int8: per-row int8; int4: int4g32 (Q4_0-like); int8g: int8 per 32 (Q8_0-like); "
                        "q4_k: GGUF Q4_K blocks (4.5 bits)")
    g.add_argument("--moe-gpu-misses", default=None, metavar="N|auto",
                   help="decode: per layer, the GPU computes up to N missed experts itself (one per 4 "
                        "misses) by reading them from pinned RAM over PCIe, alongside the CPU (auto: 0, "
                        "measured slower than the CPU on the H200 machine)")
    g.add_argument("--moe-decode", default="auto", choices=DECODE,
                   help="decode's CPU experts: a native worker fed through pinned memory, so the step is one "
                        "CUDA graph (worker; auto = on CUDA), or a host round trip per layer (sync)")


def placement_from_args(args: argparse.Namespace) -> Placement:
    a = args
    mode = _mode_flag(a)
    _check_knobs(a, mode)
    p = Placement.parse(a.placement if mode == "--placement" else _mode_text(a, mode))
    over = dict(pp_bypass=a.moe_pp_bypass, window=a.moe_window, rebalance_interval=a.moe_rebalance_interval,
                vram_budget=_budget_arg(a.vram_budget), expert_quant=a.expert_quant,
                max_swaps_per_step=a.moe_max_swaps, decode=a.moe_decode)
    for key, value in (("policy", a.moe_policy), ("profile", a.moe_profile),
                       ("gpu_misses", _gpu_misses_arg(a.moe_gpu_misses))):
        if value is not None:                       # a flag wins over the same knob in --placement's text
            over[key] = value
    return replace(p, **over)


def _mode_flag(a) -> str | None:
    flags = (("--placement", a.placement is not None), ("--experts gpu", a.experts == "gpu"),
             ("--experts cpu", a.experts == "cpu"), ("--cpu-moe", a.cpu_moe),
             ("--n-cpu-moe", a.n_cpu_moe is not None), ("--moe-hot-k", a.moe_hot_k is not None),
             ("--moe-cache", a.moe_cache is not None))
    modes = [name for name, on in flags if on]
    if modes == ["--experts cpu", "--cpu-moe"]:
        modes = ["--cpu-moe"]
    if len(modes) > 1:
        raise PlacementError(f"{' and '.join(modes)} contradict each other: choose one placement")
    return modes[0] if modes else None


def _check_knobs(a, mode: str | None) -> None:
    fixed = ("--experts gpu", "--experts cpu", "--cpu-moe", "--n-cpu-moe")
    if a.moe_profile and mode in fixed:
        raise PlacementError(f"--moe-profile needs a cache (--moe-hot-k or --moe-cache), not {mode}")
    dynamic = mode in ("--moe-hot-k", "--moe-cache", "--placement")
    for flag, val in (("--moe-window", a.moe_window), ("--moe-rebalance-interval", a.moe_rebalance_interval)):
        if val is not None and not dynamic:
            raise PlacementError(f"{flag} needs --moe-hot-k or --moe-cache")
    if a.moe_policy is not None and not (dynamic or a.moe_profile):
        raise PlacementError("--moe-policy needs --moe-cache, --moe-hot-k or --moe-profile")
    if a.moe_policy == "static" and not a.moe_profile:
        raise PlacementError("--moe-policy static needs --moe-profile FILE")


def _mode_text(a, flag: str | None) -> str:
    """The grammar text a placement flag is sugar for."""
    if flag in ("--experts cpu", "--cpu-moe"):
        return "cpu"
    if flag == "--n-cpu-moe":
        n = str(a.n_cpu_moe)
        if n != "auto":
            _int(n, "--n-cpu-moe")
        return f"layers:{n}"
    if flag == "--moe-hot-k":
        return f"hot:{a.moe_hot_k}"
    if flag == "--moe-cache":
        if a.moe_cache != "auto":
            parse_cache(a.moe_cache)                  # a clear error for an unreadable size
        return f"cache:{a.moe_cache}"
    if flag is None and a.moe_profile:
        return f"static:{a.moe_profile}"
    if flag is None and a.vram_budget is not None:
        return "layers:auto"
    return "gpu"


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PlacementError(f"{what}: expected an integer, got {text!r}") from None


def _gpu_misses_arg(v) -> int | None:
    return None if v is None or str(v) == "auto" else _int(v, "--moe-gpu-misses")


def _budget_arg(v) -> int | str | None:
    if v is None or str(v).lower() == "auto":
        return None if v is None else "auto"
    return parse_bytes(v)


def load_engine(args: argparse.Namespace, **kw) -> Engine:
    """Engine.load with the model, placement and kernel flags above (kw: Engine.load's other arguments)."""
    check_llama_compat(args)
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device,
                         placement=placement_from_args(args), max_context=args.max_context,
                         use_cuda_graph=not args.no_cuda_graph,
                         piecewise_graph=args.piecewise_graph, compile_decode=args.compile,
                         kernel_options=kernel_options_from_args(args), dense_quant=args.dense_quant,
                         host_embedding=False if args.embedding_on_gpu else None, **kw)
    try:
        check_llama_compat(args, engine.config.num_layers)
    except PlacementError:
        engine.close()
        raise
    return engine
