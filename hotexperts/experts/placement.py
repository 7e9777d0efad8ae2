"""Placement: where routed experts live, as plain data compiled from flags (llama.cpp's meaning where it
has one), and `build_executor` that turns it into an ExpertExecutor.

    gpu            every expert on the GPU (DenseExecutor, graph_safe)          --experts gpu (default)
    cpu            every routed expert on the CPU                                --cpu-moe / --experts cpu
    layers:N       experts of the first N MoE layers on the CPU, the rest GPU    --n-cpu-moe N|auto
    hot:K          K slots per layer, WindowLFU (the seed design)                --moe-hot-k K [--moe-window W
                                                                                  --moe-rebalance-interval R]
    cache:BUDGET   one slot budget ("8GiB", "8", "2000slots", "auto") shared by all layers, --moe-policy
    static:FILE    a fixed hot set from a routing profile                        --moe-profile FILE (alone)
--moe-profile with hot/cache = warm start. --vram-budget GiB|auto caps dense + KV + workspace (reserved_bytes)
+ staging + slots; alone it means layers:auto (the smallest N that fits). --moe-pp-bypass T: prompt chunks
over T tokens bypass the policy and may stream whole layers to the GPU. --expert-quant int8|int4|int8g:
quantized expert copies (CPU and slots); exactness is then against the quantized reference.
Contradictory flags or a budget too small for the dense part raise PlacementError.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass

import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.errors import PlacementError
from hotexperts.experts.budget import Budget, GiB, auto_budget, parse_bytes, parse_cache
from hotexperts.weights import QuantizedWeight

MODES = ("gpu", "cpu", "layers", "hot", "cache", "static")
DECODE = ("auto", "worker", "sync")
QUANT = {"none": None, "int8": "int8", "int4": "int4g32", "int4g32": "int4g32", "int8g": "int8g32"}
H2D_BYTES_PER_S = 40e9            # pay-back estimates for the adaptive policy (MACHINE.md: 55 GB/s pinned)
CPU_BYTES_PER_S = 40e9


@dataclass(frozen=True)
class Placement:
    mode: str = "gpu"
    n_cpu_layers: int | None = None          # layers: None = auto
    hot_k: int = 0
    cache_bytes: int | None = None           # cache: budget in bytes, or
    cache_slots: int | None = None           # ... in slots; both None = what the VRAM budget leaves
    policy: str | None = None                # cache: lru | window-lfu | decay | static | auto (default auto)
    window: int | None = None
    rebalance_interval: int | None = None
    pp_bypass: int = 64
    profile: str | None = None
    vram_budget: int | str | None = None     # bytes, "auto", or None (unlimited)
    expert_quant: str = "none"
    max_swaps_per_step: int = 4
    prompt_mode: str = "auto"                # auto | stream | hybrid (prompt chunks over pp_bypass)
    decode: str = "auto"                     # auto (worker on CUDA) | worker | sync: CPU experts in decode
    gpu_misses: int | None = None            # worker decode: misses per layer the GPU reads from host RAM
                                             # (None = auto = 0: measured slower than the CPU, runs 5-7)

    def __post_init__(self):
        if self.mode not in MODES:
            raise PlacementError(f"unknown placement {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.expert_quant not in QUANT:
            raise PlacementError(f"--expert-quant must be none, int8, int4 or int8g, "
                                 f"got {self.expert_quant!r}")
        if self.decode not in DECODE:
            raise PlacementError(f"--moe-decode must be one of {', '.join(DECODE)}, got {self.decode!r}")
        if self.gpu_misses is not None and self.gpu_misses < 0:
            raise PlacementError(f"--moe-gpu-misses must be >= 0, got {self.gpu_misses}")
        if self.mode == "static" and not self.profile:
            raise PlacementError("a static placement needs a routing profile (--moe-profile FILE)")
        if self.mode == "hot" and self.hot_k < 0:
            raise PlacementError(f"--moe-hot-k must be >= 0, got {self.hot_k}")

    @classmethod
    def parse(cls, text: str, **overrides) -> Placement:
        """'gpu' | 'cpu' | 'layers:N' | 'layers:auto' | 'hot:K' | 'cache:BUDGET[:POLICY]' | 'static:FILE'."""
        mode, _, arg = str(text).partition(":")
        mode = mode.strip().lower()
        kw: dict = {"mode": mode}
        if mode == "layers":
            kw["n_cpu_layers"] = None if arg in ("", "auto") else _int(arg, "layers:N")
        elif mode == "hot":
            kw["hot_k"] = _int(arg, "hot:K")
        elif mode == "cache":
            size, _, pol = arg.partition(":")
            if size and size != "auto":
                kw["cache_bytes"], kw["cache_slots"] = parse_cache(size)
            kw["policy"] = pol or None
        elif mode == "static":
            kw["profile"] = arg or None
        elif mode not in ("gpu", "cpu") or arg:
            raise PlacementError(f"cannot read the placement {text!r}: use gpu, cpu, layers:N, hot:K, "
                                 "cache:BUDGET or static:FILE")
        return cls(**{**kw, **overrides})

    def describe(self) -> str:
        arg = {"layers": "auto" if self.n_cpu_layers is None else self.n_cpu_layers, "hot": self.hot_k,
               "static": self.profile, "cache": self._cache_text()}.get(self.mode)
        return self.mode if arg is None else f"{self.mode}:{arg}"

    def _cache_text(self) -> str:
        if self.cache_slots is not None:
            return f"{self.cache_slots}slots"
        return "auto" if self.cache_bytes is None else f"{self.cache_bytes / GiB:g}GiB"


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PlacementError(f"{what}: expected an integer, got {text!r}") from None


# ---- flags -------------------------------------------------------------------------------------------------
def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("expert placement")
    g.add_argument("--experts", choices=("gpu", "cpu"), default=None,
                   help="all routed experts on the GPU / the CPU")
    g.add_argument("--cpu-moe", action="store_true", help="all routed experts on the CPU")
    g.add_argument("--n-cpu-moe", default=None, metavar="N|auto",
                   help="experts of the first N MoE layers on the CPU (auto: the smallest N that fits)")
    g.add_argument("--moe-hot-k", type=int, default=None, metavar="K", help="K GPU slots per MoE layer")
    g.add_argument("--moe-window", type=int, default=None, metavar="W", help="routing counted over W tokens")
    g.add_argument("--moe-rebalance-interval", type=int, default=None, metavar="R",
                   help="rebalance every R generated tokens")
    g.add_argument("--moe-pp-bypass", type=int, default=64, metavar="T",
                   help="prompt batches over T tokens bypass the cache (default 64)")
    g.add_argument("--moe-cache", default=None, metavar="BUDGET",
                   help="one slot budget for all layers: GiB ('8GiB', '8'), slots ('2000slots') or auto")
    g.add_argument("--moe-policy", default=None, choices=("lru", "window-lfu", "decay", "static", "auto"))
    g.add_argument("--moe-profile", default=None, metavar="FILE",
                   help="routing profile: static placement alone, warm start with --moe-hot-k/--moe-cache")
    g.add_argument("--moe-max-swaps", type=int, default=4, metavar="N", help="expert copies per step (4)")
    g.add_argument("--vram-budget", default=None, metavar="GiB|auto",
                   help="total VRAM the engine may use (dense + KV + workspace + slots)")
    g.add_argument("--expert-quant", default="none", choices=("none", "int8", "int4", "int8g"),
                   help="int8: per-row int8; int4: int4g32 (Q4_0-like); int8g: int8 per 32 (Q8_0-like)")
    g.add_argument("--moe-gpu-misses", default=None, metavar="N|auto",
                   help="decode: per layer, the GPU computes up to N missed experts itself (one per 4 "
                        "misses) by reading them from pinned RAM over PCIe, alongside the CPU (auto: 0, "
                        "measured slower than the CPU on the H200 machine)")
    g.add_argument("--moe-decode", default="auto", choices=DECODE,
                   help="decode's CPU experts: a native worker fed through pinned memory, so the step is one "
                        "CUDA graph (worker; auto = on CUDA), or a host round trip per layer (sync)")


def placement_from_args(args: argparse.Namespace) -> Placement:
    a = args
    flags = (("--experts gpu", a.experts == "gpu"), ("--experts cpu", a.experts == "cpu"),
             ("--cpu-moe", a.cpu_moe), ("--n-cpu-moe", a.n_cpu_moe is not None),
             ("--moe-hot-k", a.moe_hot_k is not None), ("--moe-cache", a.moe_cache is not None))
    modes = [name for name, on in flags if on]
    if modes == ["--experts cpu", "--cpu-moe"]:
        modes = ["--cpu-moe"]
    if len(modes) > 1:
        raise PlacementError(f"{' and '.join(modes)} contradict each other: choose one placement")
    if a.moe_profile and modes and modes[0] in ("--experts gpu", "--experts cpu", "--cpu-moe", "--n-cpu-moe"):
        raise PlacementError(f"--moe-profile needs a cache (--moe-hot-k or --moe-cache), not {modes[0]}")
    dynamic = bool(modes) and modes[0] in ("--moe-hot-k", "--moe-cache")
    for flag, val in (("--moe-window", a.moe_window), ("--moe-rebalance-interval", a.moe_rebalance_interval)):
        if val is not None and not dynamic:
            raise PlacementError(f"{flag} needs --moe-hot-k or --moe-cache")
    if a.moe_policy is not None and not (dynamic or a.moe_profile):
        raise PlacementError("--moe-policy needs --moe-cache, --moe-hot-k or --moe-profile")
    if a.moe_policy == "static" and not a.moe_profile:
        raise PlacementError("--moe-policy static needs --moe-profile FILE")
    common = dict(pp_bypass=a.moe_pp_bypass, profile=a.moe_profile, window=a.moe_window,
                  rebalance_interval=a.moe_rebalance_interval, policy=a.moe_policy,
                  vram_budget=_budget_arg(a.vram_budget), expert_quant=a.expert_quant,
                  max_swaps_per_step=a.moe_max_swaps, decode=getattr(a, "moe_decode", "auto"),
                  gpu_misses=_gpu_misses_arg(getattr(a, "moe_gpu_misses", None)))
    return Placement(**_mode_kwargs(a, modes[0] if modes else None), **common)


def _mode_kwargs(a, flag: str | None) -> dict:
    if flag in ("--experts cpu", "--cpu-moe"):
        return {"mode": "cpu"}
    if flag == "--n-cpu-moe":
        n = None if str(a.n_cpu_moe) == "auto" else _int(a.n_cpu_moe, "--n-cpu-moe")
        return {"mode": "layers", "n_cpu_layers": n}
    if flag == "--moe-hot-k":
        return {"mode": "hot", "hot_k": a.moe_hot_k}
    if flag == "--moe-cache":
        b, s = (None, None) if a.moe_cache == "auto" else parse_cache(a.moe_cache)
        return {"mode": "cache", "cache_bytes": b, "cache_slots": s}
    if flag is None and a.moe_profile:
        return {"mode": "static"}
    if flag is None and a.vram_budget is not None:
        return {"mode": "layers", "n_cpu_layers": None}
    return {"mode": "gpu"}


def _gpu_misses_arg(v) -> int | None:
    return None if v is None or str(v) == "auto" else _int(v, "--moe-gpu-misses")


def _budget_arg(v) -> int | str | None:
    if v is None or str(v).lower() == "auto":
        return None if v is None else "auto"
    return parse_bytes(v)


# ---- building the executor ---------------------------------------------------------------------------------
def build_executor(placement: Placement, store, cfg, device, *, reserved_bytes: int = 0, dtype=None,
                   event_factory=None, stats: bool = True, options: KernelOptions = DEFAULT_KERNELS):
    """The executor for `placement` (see module doc). reserved_bytes: VRAM of dense weights + KV + workspace
    (assumed already allocated when --vram-budget auto). dtype: the model's dtype (default: the store's).
    options: how the expert kernels run (threads, integer path, backends)."""
    p, dev = placement, torch.device(device)
    store = quantized_store(store, p.expert_quant)
    if dev.type == "cuda":
        store.pin()
    budget = resolve_budget(p, dev, reserved_bytes, store.expert_nbytes)
    if p.mode == "gpu":
        return _dense(store, dev, dtype, budget, options)
    ex = _hybrid(p, store, dev, budget, event_factory, stats, options)
    if p.decode == "worker" or (p.decode == "auto" and dev.type == "cuda"):
        ex.enable_worker(cfg.top_k, cfg.hidden_size, dtype or _store_dtype(store, dev),
                         gpu_misses=gpu_misses(p))
    return ex


def gpu_misses(p: Placement) -> int:
    """Most misses per layer the GPU reads from host memory in worker decode (one per 4 misses of a layer,
    one per 2 for large experts). Auto = 0: on the H200 the GPU's PCIe read of an expert was slower than the
    CPU computing it (Qwen3: +7% for layer offload's CPU layers, slower for caches; Mixtral: -32%)."""
    return p.gpu_misses if p.gpu_misses is not None else 0


def resolve_budget(p: Placement, device: torch.device, reserved: int, slot_bytes: int) -> Budget:
    total = auto_budget(device, reserved) if p.vram_budget == "auto" else p.vram_budget
    b = Budget(total, reserved, slot_bytes)
    b.check_dense_fits()
    return b


def quantized_store(store, quant: str):
    """--expert-quant: the store with its DENSE expert matrices quantized to the format; matrices already
    quantized keep theirs (e.g. a GGUF whose w13 is int4g32 from Q4_K and whose w2 is bf16 because some
    layers' down matrices have a type without a quantized format, such as Q3_K: w2 becomes int8). Nothing
    dense and another format asked: PlacementError."""
    fmt = QUANT[quant]
    if fmt is None:
        return store
    le = store.layer(store.layers[0])
    kinds = [getattr(w, "fmt", None) for w in (le.w13, le.w2)]
    if None not in kinds:                            # already quantized (a second call finds this too)
        if fmt not in kinds:
            have = " and ".join(dict.fromkeys(kinds))
            raise PlacementError(f"--expert-quant {quant}: the model's experts are already {have}")
        return store
    if any(kinds):
        names = [n for n, k in zip(("w13", "w2"), kinds, strict=True) if k is None]
        kept = ", ".join(k for k in kinds if k)
        warnings.warn(f"--expert-quant {quant}: only the dense expert matrices ({', '.join(names)}) become "
                      f"{fmt}; the others keep {kept}", RuntimeWarning, stacklevel=3)
    return store.quantize(fmt)                      # quantizes the dense matrices, keeps quantized ones


def _dense(store, dev, dtype, budget: Budget, options: KernelOptions):
    """CUDA: GpuExecutor (one fused kernel per layer, graph-safe); elsewhere the DenseExecutor oracle."""
    from hotexperts.experts.hybrid import GpuExecutor
    from hotexperts.experts.reference import DenseExecutor

    need, free = store.nbytes, budget.free_for_experts
    hint = "use --n-cpu-moe, --moe-hot-k or --moe-cache"
    if free is not None and need > free:
        raise PlacementError(f"all experts on the GPU need {need / GiB:.2f} GiB but the VRAM budget leaves "
                             f"{free / GiB:.2f} GiB; {hint}")
    if dev.type != "cuda":
        ex = DenseExecutor({l: store.layer(l) for l in store.layers}, dev, dtype or _store_dtype(store, dev))
        ex.graph_safe = False                       # it synchronises (ids.unique()); fine for an oracle
        return ex
    try:
        return GpuExecutor(store, dev, options=options)
    except torch.cuda.OutOfMemoryError:
        raise PlacementError(f"out of VRAM putting all experts ({need / GiB:.2f} GiB) on the GPU; "
                             f"{hint}") from None


def _store_dtype(store, dev) -> torch.dtype:
    w = store.layer(store.layers[0]).w13
    if isinstance(w, QuantizedWeight):
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    return w.dtype


def _staging_bytes(p: Placement, store, dev) -> int:
    from hotexperts.experts.staging import StagingPools

    if p.prompt_mode == "hybrid":
        return 0
    return StagingPools.nbytes(store) if dev.type == "cuda" or p.prompt_mode == "stream" else 0


def plan_slots(p: Placement, store, budget: Budget, staging: int) -> tuple[int, list[int], int]:
    """-> (slots to allocate, layers the slot cache covers, staging bytes kept)."""
    E, layers, sb = store.num_experts, store.layers, budget.slot_bytes
    free = budget.free_for_experts
    fits = (lambda n, st: True) if free is None else (lambda n, st: n * sb + st <= free)
    if p.mode == "cpu":
        return 0, [], staging if fits(0, staging) else 0
    if p.mode == "layers":
        n_cpu = p.n_cpu_layers if p.n_cpu_layers is not None else _auto_n(layers, E, fits, staging)
        if not 0 <= n_cpu <= len(layers):
            raise PlacementError(f"--n-cpu-moe must be in [0, {len(layers)}] (MoE layers), got {n_cpu}")
        need = (len(layers) - n_cpu) * E
        st = staging if n_cpu and fits(need, staging) else 0
        if not fits(need, 0):
            raise PlacementError(_too_small(f"--n-cpu-moe {n_cpu}", need, sb, free))
        return need, layers[n_cpu:], st
    if p.mode == "hot":
        need = min(p.hot_k, E) * len(layers)
        if not fits(need, 0):
            raise PlacementError(_too_small(f"--moe-hot-k {p.hot_k}", need, sb, free))
        return need, layers, staging if fits(need, staging) else 0
    return _budget_slots(p, store, budget, staging, fits)


def _budget_slots(p, store, budget, staging, fits):
    """cache / static: the requested size, capped by what the VRAM budget leaves."""
    E, layers, sb, free = store.num_experts, store.layers, budget.slot_bytes, budget.free_for_experts
    want = p.cache_slots if p.cache_slots is not None else (
        p.cache_bytes // sb if p.cache_bytes is not None else None)
    if want is None and p.mode == "static":
        from hotexperts.experts.policy import load_profile

        want = sum(len(h) for h in load_profile(p.profile, E).hot.values()) or None
        if want is None and free is None:
            raise PlacementError(f"the profile {p.profile} lists no hot experts: give a cache size "
                                 "(--moe-cache BUDGET) or a --vram-budget")
    room = None if free is None else max(0, free // sb)
    if want is None and room is not None and staging <= free:
        want = (free - staging) // sb       # "as many slots as fit": keep the prompt staging pools first
    if want is None:
        want = E * len(layers) if room is None else room
    st = staging if fits(min(want, room if room is not None else want), staging) else 0
    if room is not None:
        room = max(0, (free - st) // sb)
        if want > room:
            warn(f"the expert cache is limited to {room} slots by the VRAM budget (asked for {want})")
            want = room
    return min(want, E * len(layers)), layers, st


def _auto_n(layers, E, fits, staging) -> int:
    for n in range(len(layers) + 1):
        need = (len(layers) - n) * E
        if fits(need, staging if n else 0):
            return n
    return len(layers)


def _too_small(what: str, need: int, sb: int, free: int | None) -> str:
    return (f"{what} needs {need} expert slots ({need * sb / GiB:.2f} GiB) but the VRAM budget leaves "
            f"{(free or 0) / GiB:.2f} GiB after the dense weights, KV cache and workspace")


def _hybrid(p: Placement, store, dev, budget: Budget, event_factory, stats: bool, options: KernelOptions):
    from hotexperts.experts.hybrid import HybridExecutor
    from hotexperts.experts.slots import SlotCache
    from hotexperts.experts.stats import CacheStats

    n_slots, layers, staging = plan_slots(p, store, budget, _staging_bytes(p, store, dev))
    st = CacheStats(store.layers) if stats else None
    slots = None
    if n_slots > 0:
        slots = SlotCache(store, layers, n_slots, dev, stats=st, event_factory=event_factory)
    ctl = _controller(p, store, slots, layers) if slots is not None and p.mode != "layers" else None
    if slots is not None:
        slots.controller = ctl
        _initial_fill(p, store, slots, ctl, layers)
    ex = HybridExecutor(store, dev, slots=slots, controller=ctl, stats=st, pp_bypass=p.pp_bypass,
                        prompt_mode=p.prompt_mode, staging=staging > 0, options=options)
    ex.placement = p
    return ex


def _controller(p: Placement, store, slots, layers):
    from hotexperts.experts.policy import CacheController

    E, S = store.num_experts, slots.num_slots
    policy = _policy(p, store)
    if p.mode == "hot":
        return CacheController(policy, layers, E, capacity=S // len(layers),
                               max_swaps_per_step=p.max_swaps_per_step, prompt_bypass=p.pp_bypass)
    return CacheController(policy, layers, E, capacity=None, budget=S,
                           max_swaps_per_step=p.max_swaps_per_step, prompt_bypass=p.pp_bypass)


def _policy(p: Placement, store):
    from hotexperts.experts.policy import load_profile, make_policy, policy_from_profile

    if p.mode == "static" or p.policy == "static":
        return make_policy("static", profile=load_profile(p.profile, store.num_experts))
    if p.mode == "hot":
        name = p.policy or "window-lfu"
    else:
        name = p.policy or "auto"
    kw = {"interval": p.rebalance_interval, "window": p.window,
          "cpu_seconds_per_expert": store.expert_nbytes / CPU_BYTES_PER_S,
          "copy_seconds_per_expert": store.expert_nbytes / H2D_BYTES_PER_S}
    kw = _accepted(name, kw)
    if p.profile and name != "static":
        return policy_from_profile(load_profile(p.profile, store.num_experts), name, **kw)
    return make_policy(name, **kw)


def _accepted(name: str, kw: dict) -> dict:
    """The parameters policy `name` takes (LRU has no window or interval: ignored, with a warning)."""
    import inspect

    from hotexperts.experts.policy import ALIASES, POLICIES

    cls = POLICIES.get(ALIASES.get(name, name))
    if cls is None:
        return kw
    names = set(inspect.signature(cls.__init__).parameters)
    dropped = [k for k, v in kw.items() if v is not None and k not in names and not k.endswith("_per_expert")]
    if dropped:
        flag = {"interval": "--moe-rebalance-interval", "window": "--moe-window"}
        warn(f"policy {name} ignores {', '.join(flag.get(k, k) for k in dropped)}")
    return {k: v for k, v in kw.items() if k in names}


def _initial_fill(p: Placement, store, slots, ctl, layers) -> None:
    """layers:N -> every expert of the GPU layers (as many as the slots hold); profile -> warm start; else
    every slot gets a placeholder (CacheController.cold_start)."""
    E = store.num_experts
    if ctl is None:
        full = layers[len(layers) - slots.num_slots // E:] if slots.num_slots < E * len(layers) else layers
        if len(full) < len(layers):
            warn(f"only {len(full)} of {len(layers)} GPU layers fit in the slots; the rest run on the CPU")
        slots.fill_now({l: list(range(E)) for l in full})
        return
    if p.profile:
        from hotexperts.experts.policy import load_profile

        loads = ctl.warm_start(load_profile(p.profile, E))
    else:
        loads = ctl.cold_start()                 # placeholders: no slot idles until routing is known
    slots.issue(loads)
    slots.wait_all()


def warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
