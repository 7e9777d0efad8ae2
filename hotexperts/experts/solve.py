"""solve: a Placement (what the user asked, experts/placement.py) against one VRAM budget -> the
PlacementPlan the executor runs. The one place where slot counts, the prompt staging pools and the
dequantize chunk are derived from a budget: the engine, the bench and the CPU-only predictors all call it.
Torch-free.

    sizes = ModelSizes(moe_layers, num_experts, slot_bytes, staging_bytes, expert_bytes, dequant_bytes,
                       dequant_chunk)
    plan = solve(placement, sizes, Budget(total | None, reserved, slot_bytes, parts))
    every_expert_resident(plan, num_experts)   # no CPU layer, no miss: no prompt staging needed

free = the budget minus the CUDA context, dense weights, KV cache and the activation workspace (None =
unlimited). It pays, in this order:
  1. the dequantize chunk (quantized experts computed on the GPU in a prompt batch are dequantized
     `dequant_chunk` experts at a time): the asked chunk when it takes at most 1/DEQUANT_SHARE of free,
     else fewer, at least MIN_DEQUANT_CHUNK; the MIN_DEQUANT_CHUNK plan is taken instead whenever it keeps
     every expert resident and the bigger chunk does not, or the asked slots fit only with it. Not
     counted in a plan that computes no expert on the GPU (cpu without staging).
  2. the expert slots of the mode (below),
  3. the prompt staging pools from what is left (`_staging`): none when every expert is resident, when no
     staging is wanted (no CUDA, prompt mode hybrid) or when fewer than E / MIN_STAGE_PART experts per pool
     fit (then prompt batches take the hybrid path and the plan says so); else two pools (double buffer)
     of as many experts as fit, at most a whole layer each: a layer whose missing experts exceed a pool
     streams in parts. Where slots are sized by the budget (hot:auto, cache:auto, static / shared without a
     size) staging takes at most 1/STAGING_SHARE of free (but never less than its least, E / MIN_STAGE_PART
     experts per pool, while that fits).

Per mode:
    gpu          every expert resident; PlacementError when they do not fit
    cpu          no slot
    layers:N     the last Lm - N MoE layers' experts resident (auto: the smallest N that fits with at least
                 the smallest staging beside it when some layer is on the CPU; else the smallest N that fits)
    hot:K        K slots per layer (auto: what is left after staging, per layer, at most E)
    cache, static  one shared pool: the asked size (bytes or slots; static: the profile's hot set), capped by
                 the budget with a warning; auto = everything the budget leaves after staging
    explicit     the given table; 'shared' layers share what is left (as cache:auto)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from hotexperts.errors import PlacementError
from hotexperts.experts.budget import Budget, GiB
from hotexperts.experts.placement import Placement, PlacementPlan, Staging
from hotexperts.experts.profile import load_profile

MIN_STAGE_PART = 8          # a staging pool holds at least E / 8 experts (a layer in at most 8 parts)
STAGING_SHARE = 4           # budget-sized slots: staging takes at most a quarter of what the budget leaves
DEQUANT_SHARE = 16          # the dequantize chunk takes at most 1/16 of what the budget leaves ...
MIN_DEQUANT_CHUNK = 4       # ... but at least 4 experts (fewer: 4 launches per expert in a prompt batch)


@dataclass(frozen=True)
class ModelSizes:
    moe_layers: tuple[int, ...]
    num_experts: int
    slot_bytes: int               # one expert in the slot format (the store's format)
    staging_bytes: int = 0        # two whole-layer staging pools (the most staging wants); 0 = none wanted
    expert_bytes: int = 0         # every routed expert (the gpu placement's need); 0 = E * Lm * slot_bytes
    dequant_bytes: int = 0        # one expert dequantized for a prompt batch; 0 = float experts (none)
    dequant_chunk: int = 0        # experts the kernel dequantizes at a time when VRAM allows

    @property
    def all_experts(self) -> int:
        return self.expert_bytes or self.num_experts * len(self.moe_layers) * self.slot_bytes

    @property
    def min_stage(self) -> int:
        return max(1, -(-self.num_experts // MIN_STAGE_PART))


Fits = Callable[[int, int], bool]          # (slots, staging bytes) -> fits the budget


def solve(p: Placement, sizes: ModelSizes, budget: Budget) -> PlacementPlan:
    """The plan for `p` (module doc); PlacementError when the placement cannot fit at all."""
    budget.check_dense_fits()
    free = budget.free_for_experts
    chunk = _dequant_chunk(sizes, free)
    small = min(chunk, MIN_DEQUANT_CHUNK)
    try:
        plan = _solve_with(p, sizes, budget, chunk)
    except PlacementError:
        if small == chunk:
            raise
        return _solve_with(p, sizes, budget, small)        # the asked slots fit with the smallest chunk
    if free is not None and small < chunk and not _all_resident(plan, sizes):
        try:
            tight = _solve_with(p, sizes, budget, small)
        except PlacementError:
            tight = None
        if tight is not None and _all_resident(tight, sizes):
            plan = tight
    return plan


def _solve_with(p: Placement, sizes: ModelSizes, budget: Budget, chunk: int) -> PlacementPlan:
    free = budget.free_for_experts
    room = None if free is None else free - chunk * sizes.dequant_bytes
    if room is not None and room < 0:
        room, chunk = free, 0                        # not even one dequantized expert: CPU experts only
    solver = {"gpu": _gpu, "cpu": _cpu, "layers": _layers, "hot": _hot, "cache": _pool, "static": _pool,
              "explicit": _explicit}[p.mode]
    where, shared, staging = solver(p, sizes, room)
    plan = PlacementPlan(where, p, shared, staging, sizes.slot_bytes)
    gpu_compute = plan.dense or bool(staging) or plan.num_slots(sizes.num_experts) > 0
    if gpu_compute and sizes.dequant_bytes and not chunk:
        raise PlacementError(_too_small(f"the placement {p.describe()}", 1, sizes.dequant_bytes, free,
                                        "a dequantized expert"))
    chunk = chunk if gpu_compute and sizes.dequant_bytes else 0
    return replace(plan, dequant_chunk=chunk, vram=_vram(plan, sizes, budget, chunk))


def _vram(plan: PlacementPlan, sizes: ModelSizes, budget: Budget, chunk: int) -> dict:
    """The breakdown in bytes: the reserved parts (the dequantize chunk added to the workspace), staging and
    slots; total None when the budget is unlimited."""
    parts = dict(budget.parts or {"reserved": budget.reserved})
    key = "workspace" if "workspace" in parts else "reserved"
    parts[key] = parts.get(key, 0) + chunk * sizes.dequant_bytes
    slots = sizes.all_experts if plan.dense else plan.num_slots(sizes.num_experts) * sizes.slot_bytes
    return {"total": budget.total, **parts, "staging": plan.staging.nbytes(sizes.slot_bytes), "slots": slots}


def _dequant_chunk(sizes: ModelSizes, free: int | None) -> int:
    """Experts dequantized at a time (module doc, step 1); 0 for float experts."""
    want, per = sizes.dequant_chunk, sizes.dequant_bytes
    if not per or not want:
        return 0
    if free is None:
        return want
    share = free // DEQUANT_SHARE // per
    return max(0, min(want, max(share, MIN_DEQUANT_CHUNK), free // per))


def _all_resident(plan: PlacementPlan, sizes: ModelSizes) -> bool:
    return every_expert_resident(plan, sizes.num_experts)


def every_expert_resident(plan: PlacementPlan, num_experts: int) -> bool:
    """Every routed expert of every MoE layer in a GPU slot: no CPU layer, no miss, no staging needed."""
    return plan.dense or plan.num_slots(num_experts) >= num_experts * len(plan.where)


def _fits(room: int | None, sb: int) -> Fits:
    return (lambda n, st: True) if room is None else (lambda n, st: n * sb + st <= room)


def _staging(sizes: ModelSizes, room: int | None, can_miss: bool, share: int = 1) -> Staging:
    """The prompt staging pools that `room` bytes (None = unlimited) hold (module doc, step 3); share > 1:
    at most room / share unless two whole layers fit in it."""
    if not sizes.staging_bytes:
        return Staging(why="not wanted here: no CUDA, or prompt mode hybrid")
    if not can_miss:
        return Staging(why="every expert resident")
    E, sb = sizes.num_experts, sizes.slot_bytes
    if room is None:
        return Staging(2, E)
    per = min(E, max(0, room) // share // (2 * sb))
    if per < sizes.min_stage <= max(0, room) // (2 * sb):
        per = sizes.min_stage                        # the share never pushes the pools below their least
    if per < sizes.min_stage:
        return Staging(why=f"the budget is too tight: prompt batches use the hybrid path (two pools of "
                           f"{sizes.min_stage} experts need {2 * sizes.min_stage * sb / GiB:.2f} GiB)",
                       tight=True)
    return Staging(2, per)


def _gpu(p, sizes, room):
    need = sizes.all_experts
    if room is not None and need > room:
        raise PlacementError(f"all experts on the GPU need {need / GiB:.2f} GiB but the VRAM budget leaves "
                             f"{room / GiB:.2f} GiB; use --n-cpu-moe, --moe-hot-k or --moe-cache")
    return {l: "gpu" for l in sizes.moe_layers}, 0, _staging(sizes, room, can_miss=False)


def _cpu(p, sizes, room):
    return {l: "cpu" for l in sizes.moe_layers}, 0, _staging(sizes, room, can_miss=True)


def _layers(p, sizes, room):
    layers, E, sb = sizes.moe_layers, sizes.num_experts, sizes.slot_bytes
    n_cpu = p.n_cpu_layers if p.n_cpu_layers is not None else _auto_n(sizes, room)
    if not 0 <= n_cpu <= len(layers):
        raise PlacementError(f"--n-cpu-moe must be in [0, {len(layers)}] (MoE layers), got {n_cpu}")
    need = (len(layers) - n_cpu) * E
    if not _fits(room, sb)(need, 0):
        raise PlacementError(_too_small(f"--n-cpu-moe {n_cpu}", need, sb, room))
    where = {l: ("cpu" if i < n_cpu else "gpu") for i, l in enumerate(layers)}
    return where, 0, _staging(sizes, _left(room, need * sb), can_miss=n_cpu > 0)


def _auto_n(sizes: ModelSizes, room: int | None) -> int:
    """The fewest CPU layers that fit with the smallest staging beside them (none needed at 0 CPU layers);
    failing that, the fewest that fit at all (prompt batches then take the hybrid path)."""
    layers, E, sb = sizes.moe_layers, sizes.num_experts, sizes.slot_bytes
    fits = _fits(room, sb)
    least = 2 * sizes.min_stage * sb if sizes.staging_bytes else 0
    for staging in (least, 0):
        for n in range(len(layers) + 1):
            if fits((len(layers) - n) * E, staging if n else 0):
                return n
    return len(layers)


def _hot(p, sizes, room):
    layers, E, sb = sizes.moe_layers, sizes.num_experts, sizes.slot_bytes
    k = p.hot_k if p.hot_k is not None else _auto_k(sizes, room)
    need = min(k, E) * len(layers)
    if not _fits(room, sb)(need, 0):
        raise PlacementError(_too_small(f"--moe-hot-k {k}", need, sb, room))
    return {l: min(k, E) for l in layers}, 0, _staging(sizes, _left(room, need * sb), can_miss=k < E)


def _auto_k(sizes: ModelSizes, room: int | None) -> int:
    """hot:auto: the slots per layer the budget leaves beside the (budget-shared) staging pools."""
    E, L, sb = sizes.num_experts, len(sizes.moe_layers), sizes.slot_bytes
    if room is None or E * L * sb <= room:
        return E
    st = _staging(sizes, room, can_miss=True, share=STAGING_SHARE).nbytes(sb)
    return max(0, min(E, (room - st) // sb // L))


def _pool(p, sizes, room):
    """cache / static: one shared pool of the requested size, capped by what the VRAM budget leaves."""
    layers, E, sb = sizes.moe_layers, sizes.num_experts, sizes.slot_bytes
    want = p.cache_slots if p.cache_slots is not None else (
        p.cache_bytes // sb if p.cache_bytes is not None else None)
    if want is None and p.mode == "static":
        want = sum(len(h) for h in load_profile(p.profile, E).hot.values()) or None
        if want is None and room is None:
            raise PlacementError(f"the profile {p.profile} lists no hot experts: give a cache size "
                                 "(--moe-cache BUDGET) or a --vram-budget")
    want, staging = _pool_size(want, E * len(layers), sizes, room)
    return {l: "shared" for l in layers}, want, staging


def _pool_size(want: int | None, most: int, sizes: ModelSizes, room: int | None) -> tuple[int, Staging]:
    """(pool slots, staging): `want` slots (None = as many as the budget leaves beside staging, sized as
    the module doc says), capped by `room` bytes (None = unlimited, with a warning), at most `most`."""
    sb = sizes.slot_bytes
    if want is None:
        if room is None or most * sb <= room:
            return most, _staging(sizes, room, can_miss=False)
        staging = _staging(sizes, room, can_miss=True, share=STAGING_SHARE)
        return min(most, (room - staging.nbytes(sb)) // sb), staging
    cap = None if room is None else max(0, room // sb)
    if cap is not None and want > cap:
        warnings.warn(f"the expert cache is limited to {cap} slots by the VRAM budget (asked for {want})",
                      RuntimeWarning, stacklevel=6)
        want = cap
    want = min(want, most)
    return want, _staging(sizes, _left(room, want * sb), can_miss=want < most)


def _left(room: int | None, used: int) -> int | None:
    return None if room is None else room - used


def _explicit(p, sizes, room):
    where = _table(p, sizes.moe_layers)
    E, sb = sizes.num_experts, sizes.slot_bytes
    fixed = E * sum(w == "gpu" for w in where.values()) + sum(w for w in where.values() if isinstance(w, int))
    if not _fits(room, sb)(fixed, 0):
        raise PlacementError(_too_small(f"the placement {p.describe()}", fixed, sb, room))
    n_shared = sum(w == "shared" for w in where.values())
    if n_shared and any(isinstance(w, int) for w in where.values()):
        raise PlacementError(f"{p.describe()} mixes per-layer slots and a shared pool: choose one")
    can_miss = any(w == "cpu" or (isinstance(w, int) and w < E) for w in where.values())
    left = _left(room, fixed * sb)
    if not n_shared:
        return where, 0, _staging(sizes, left, can_miss)
    shared, staging = _pool_size(None, E * n_shared, sizes, left)
    if shared == E * n_shared:                       # the shared layers all resident: the others decide
        staging = _staging(sizes, _left(left, shared * sb), can_miss)
    return where, shared, staging


def _table(p: Placement, moe_layers: Sequence[int]) -> dict[int, int | str]:
    """The explicit RANGE=WHERE items applied in order over the MoE layers (later items win)."""
    where: dict[int, int | str] = {}
    for a, b, w in p.layer_map:
        for l in moe_layers:
            if a is None or a <= l <= b:
                where[l] = int(w[5:]) if w.startswith("slots") else w
    missing = [l for l in moe_layers if l not in where]
    if missing:
        raise PlacementError(f"the placement {p.describe()} leaves MoE layer(s) {missing[:8]} without a "
                             "place (add e.g. all=cpu first)")
    return {l: where[l] for l in moe_layers}


def _too_small(what: str, need: int, sb: int, room: int | None, unit: str = "expert slots") -> str:
    return (f"{what} needs {need} {unit} ({need * sb / GiB:.2f} GiB) but the VRAM budget leaves "
            f"{(room or 0) / GiB:.2f} GiB after the CUDA context, dense weights, KV cache and workspace")
