"""Build the executor for a placement: quantize the store as asked, solve the plan against the VRAM budget
(experts/solve.py), then allocate slots, the planner and the executor for that plan.

    plan, store = plan_placement(placement, store, device, reserved_bytes=0)   # the plan, nothing allocated
    ex = build_executor(placement, store, cfg, device, *, reserved_bytes=0, dtype=None, options=...)
    ex.plan                                     # the PlacementPlan it runs (printable: plan.describe()),
                                                # handed to every executor's constructor

Which executor a plan gets: `plan.dense` (the gpu placement) -> GpuExecutor on CUDA (DenseExecutor, the
oracle, elsewhere);
anything else -> HybridExecutor over one SlotCache covering the plan's non-CPU layers ("gpu" layers filled
with every expert, fixed; "slots K" / "shared" layers managed by a CachePlanner: placeholders at load, or a
profile's hot set), with the native decode worker on CUDA (`decode` auto) or when asked (`worker`).
reserved_bytes: VRAM of the CUDA context, dense weights, KV and workspace (assumed already allocated when
--vram-budget auto). model_sizes / expert_sizes: what the solver knows of the experts (slot bytes, the
staging it may want, the dequantize chunk of quantized experts on CUDA), from a store or from numbers.
"""

from __future__ import annotations

import inspect
import warnings

import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.errors import PlacementError
from hotexperts.experts.budget import Budget, GiB
from hotexperts.experts.gpu_executor import GpuExecutor
from hotexperts.experts.hybrid import HybridExecutor
from hotexperts.experts.placement import Placement, PlacementPlan
from hotexperts.experts.planner import CachePlanner
from hotexperts.experts.policies import ALIASES, POLICIES, make_policy, policy_from_profile
from hotexperts.experts.profile import load_profile
from hotexperts.experts.reference import DenseExecutor
from hotexperts.experts.slots import SlotCache
from hotexperts.experts.solve import ModelSizes, solve
from hotexperts.experts.stats import CacheStats
from hotexperts.formats import EXPERT_QUANT
from hotexperts.kernels.gpu_moe import DEQUANT_CHUNK_BYTES, DEQUANT_CHUNK_MAX
from hotexperts.weights import QuantizedWeight

AUTO_MARGIN = 1 * GiB             # --vram-budget auto: kept free for the allocator, cuBLAS and fragmentation
H2D_BYTES_PER_S = 40e9            # pay-back estimates for the adaptive policy (MACHINE.md: 55 GB/s pinned)
CPU_BYTES_PER_S = 40e9


def build_executor(placement: Placement, store, cfg, device, *, reserved_bytes: int = 0, dtype=None,
                   event_factory=None, stats: bool = True, options: KernelOptions = DEFAULT_KERNELS,
                   reserved_parts: dict | None = None):
    """The executor for `placement` (module doc). dtype: the model's dtype (default: the store's);
    reserved_parts: reserved_bytes' breakdown (context, dense, kv, workspace), for the plan's report."""
    dev = torch.device(device)
    plan, store = plan_placement(placement, store, dev, reserved_bytes, reserved_parts, dtype)
    dtype = dtype or _store_dtype(store, dev)
    if plan.dense:
        return _all_gpu(plan, store, dev, dtype, options)
    ex = _hybrid(plan, store, dev, event_factory, stats, options)
    p = plan.placement
    if p.decode == "worker" or (p.decode == "auto" and dev.type == "cuda"):
        ex.enable_worker(cfg.top_k, cfg.hidden_size, dtype, gpu_misses=gpu_misses(p))
    return ex


def plan_placement(placement: Placement, store, device, reserved_bytes: int = 0, reserved_parts=None,
                   dtype: torch.dtype | None = None):
    """-> (the solved PlacementPlan, the store in the placement's expert format, pinned on CUDA)."""
    dev = torch.device(device)
    store = quantized_store(store, placement.expert_quant)
    if dev.type == "cuda":
        store.pin()
    total = auto_budget(dev, reserved_bytes) if placement.vram_budget == "auto" else placement.vram_budget
    budget = Budget(total, reserved_bytes, store.expert_nbytes, dict(reserved_parts or {}))
    sizes = model_sizes(store, placement, dev, dtype or _store_dtype(store, dev))
    return solve(placement, sizes, budget), store


def model_sizes(store, placement: Placement, device: torch.device, dtype: torch.dtype) -> ModelSizes:
    """What the solver needs to know of the store (expert_sizes' numbers)."""
    le = store.layer(store.layers[0])
    params = le.w13.shape[1] * le.w13.shape[2] + le.w2.shape[1] * le.w2.shape[2]      # logical shapes
    return expert_sizes(tuple(store.layers), store.num_experts, store.expert_nbytes, params,
                        placement.prompt_mode,
                        cuda=device.type == "cuda", quantized=isinstance(le.w13, QuantizedWeight),
                        dtype_bytes=dtype.itemsize,
                        expert_bytes=store.nbytes)


def expert_sizes(moe_layers: tuple[int, ...], num_experts: int, slot_bytes: int, expert_params: int,
                 prompt_mode: str = "auto", *, cuda: bool, quantized: bool, dtype_bytes: int = 2,
                 expert_bytes: int = 0) -> ModelSizes:
    """ModelSizes from numbers (a store's, or a real model's shape for a plan without weights):
    the staging pools are wanted where prompt chunks stream (on CUDA, or with prompt_mode "stream"); the
    dequantize chunk where quantized experts run the GPU's prompt path (CUDA): kernels/gpu_moe's
    DEQUANT_CHUNK_BYTES worth of experts in the model's dtype (fp32 unless bf16/fp16), at most
    DEQUANT_CHUNK_MAX."""
    stream = prompt_mode != "hybrid" and (cuda or prompt_mode == "stream")
    staging = 2 * num_experts * slot_bytes if stream else 0
    per = expert_params * (dtype_bytes if dtype_bytes == 2 else 4) if cuda and quantized else 0
    chunk = max(1, min(DEQUANT_CHUNK_MAX, DEQUANT_CHUNK_BYTES // per)) if per else 0
    return ModelSizes(moe_layers, num_experts, slot_bytes, staging, expert_bytes, per, chunk)


def gpu_misses(p: Placement) -> int:
    """Most misses per layer the GPU reads from host memory in worker decode (one per 4 misses of a layer,
    one per 2 for large experts). Auto = 0: on the H200 the GPU's PCIe read of an expert was slower than the
    CPU computing it (Qwen3: +7% for layer offload's CPU layers, slower for caches; Mixtral: -32%)."""
    return p.gpu_misses if p.gpu_misses is not None else 0


def auto_budget(device: torch.device | str, reserved_bytes: int = 0, margin: int = AUTO_MARGIN) -> int:
    """Free VRAM on `device` plus what the engine already holds (`reserved_bytes`), minus a margin."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise PlacementError("--vram-budget auto needs a CUDA device; give a size like '16GiB' instead")
    free, _total = torch.cuda.mem_get_info(dev)
    return max(0, free + reserved_bytes - margin)


def quantized_store(store, quant: str):
    """--expert-quant: the store with its DENSE expert matrices quantized to the format; matrices already
    quantized keep theirs (e.g. a GGUF whose w13 is int4g32 from Q4_K and whose w2 is bf16 because some
    layers' down matrices have a type without a quantized format, such as Q3_K: w2 becomes int8). Nothing
    dense and another format asked: PlacementError."""
    fmt = EXPERT_QUANT[quant]
    if fmt is None:
        return store
    le = store.layer(store.layers[0])
    kinds = [w.fmt if isinstance(w, QuantizedWeight) else None for w in (le.w13, le.w2)]
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
    try:
        return store.quantize(fmt)                  # quantizes the dense matrices, keeps quantized ones
    except ValueError as e:                         # a block size the experts' shapes do not divide
        w13, w2 = le.w13.shape, le.w2.shape
        raise PlacementError(f"--expert-quant {quant}: {e} (the experts are [{w13[-2]}, {w13[-1]}] and "
                             f"[{w2[-2]}, {w2[-1]}]); choose a format whose block divides both, e.g. "
                             "int8 (per row)") from None


def _store_dtype(store, dev) -> torch.dtype:
    w = store.layer(store.layers[0]).w13
    if isinstance(w, QuantizedWeight):
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    return w.dtype


def _all_gpu(plan: PlacementPlan, store, dev, dtype, options: KernelOptions):
    """CUDA: GpuExecutor (one fused kernel per layer, graph-safe); elsewhere the DenseExecutor oracle."""
    if dev.type != "cuda":
        return DenseExecutor({l: store.layer(l) for l in store.layers}, dev, dtype, plan=plan)
    try:
        return GpuExecutor(store, dev, options=options, plan=plan)
    except torch.cuda.OutOfMemoryError:
        raise PlacementError(f"out of VRAM putting all experts ({store.nbytes / GiB:.2f} GiB) on the GPU; "
                             "use --n-cpu-moe, --moe-hot-k or --moe-cache") from None


def _hybrid(plan: PlacementPlan, store, dev, event_factory, stats: bool, options: KernelOptions):
    p, E = plan.placement, store.num_experts
    st = CacheStats(store.layers) if stats else None
    n_slots, slots, planner = plan.num_slots(E), None, None
    if n_slots > 0:
        slots = SlotCache(store, plan.slot_layers, n_slots, dev, stats=st, event_factory=event_factory)
        full = _fill_fixed(plan, store, slots)
        if plan.managed:
            planner = _planner(plan, store, slots.num_slots - E * len(full))
            _seed(planner, plan, store, slots)
    return HybridExecutor(store, dev, slots=slots, planner=planner, stats=st, pp_bypass=p.pp_bypass,
                          prompt_mode=p.prompt_mode, staging=plan.staging, options=options, plan=plan)


def _fill_fixed(plan: PlacementPlan, store, slots: SlotCache) -> list[int]:
    """Every expert of the plan's "gpu" layers, as many layers as the slots hold (the last ones: layer
    offload keeps the first N on the CPU; the pool shrinks when VRAM runs out). -> the layers filled."""
    E, fixed = store.num_experts, plan.layers("gpu")
    full = fixed[len(fixed) - min(len(fixed), slots.num_slots // E):]
    if len(full) < len(fixed):
        warnings.warn(f"only {len(full)} of {len(fixed)} GPU layers fit in the slots; the rest run on the "
                      "CPU", RuntimeWarning, stacklevel=4)
    if full:
        slots.fill_now({l: list(range(E)) for l in full})
    return full


def _planner(plan: PlacementPlan, store, room: int) -> CachePlanner:
    """The planner of the managed layers over the `room` slots they really got (the pool shrinks when
    VRAM runs out: then every layer alike)."""
    p, E, managed = plan.placement, store.num_experts, plan.managed
    kw = {"max_swaps_per_step": p.max_swaps_per_step, "prompt_bypass": p.pp_bypass}
    if plan.layers("shared"):
        return CachePlanner(_policy(plan, store), managed, E, capacity=None, budget=max(0, room), **kw)
    asked = {l: plan.where[l] for l in managed}
    caps = asked if sum(asked.values()) <= room else max(0, room) // len(managed)
    return CachePlanner(_policy(plan, store), managed, E, capacity=caps, **kw)


def _policy(plan: PlacementPlan, store):
    p, name = plan.placement, plan.policy
    if name == "static":
        return make_policy("static", profile=load_profile(p.profile, store.num_experts))
    kw = {"interval": p.rebalance_interval, "window": p.window,
          "cpu_seconds_per_expert": store.expert_nbytes / CPU_BYTES_PER_S,
          "copy_seconds_per_expert": store.expert_nbytes / H2D_BYTES_PER_S}
    kw = _accepted(name, kw)
    if p.profile:
        return policy_from_profile(load_profile(p.profile, store.num_experts), name, **kw)
    return make_policy(name, **kw)


def _accepted(name: str, kw: dict) -> dict:
    """The parameters policy `name` takes (LRU has no window or interval: ignored, with a warning)."""
    cls = POLICIES.get(ALIASES.get(name, name))
    if cls is None:
        return kw
    names = set(inspect.signature(cls.__init__).parameters)
    dropped = [k for k, v in kw.items() if v is not None and k not in names and not k.endswith("_per_expert")]
    if dropped:
        flag = {"interval": "--moe-rebalance-interval", "window": "--moe-window"}
        warnings.warn(f"policy {name} ignores {', '.join(flag.get(k, k) for k in dropped)}", RuntimeWarning,
                      stacklevel=4)
    return {k: v for k, v in kw.items() if k in names}


def _seed(planner: CachePlanner, plan: PlacementPlan, store, slots: SlotCache) -> None:
    """The managed layers start with a profile's hot set (warm start) or placeholders in every slot
    (CachePlanner.cold_start: no slot idles until routing is known); waits for the copies."""
    p = plan.placement
    if p.profile:
        loads = planner.warm_start(load_profile(p.profile, store.num_experts), slots.residency)
    else:
        loads = planner.cold_start(slots.residency)
    slots.issue(loads)
    slots.wait_all()
