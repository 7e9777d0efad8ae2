"""solve: a Placement (what the user asked, experts/placement.py) against one VRAM budget -> the
PlacementPlan the executor runs. The one place where slot counts are derived from a budget: the engine, the
bench and the CPU-only predictor (bench/predict.py, for a real model's shape) all call it. Torch-free.

    sizes = ModelSizes(moe_layers, num_experts, slot_bytes, staging_bytes, expert_bytes)
    plan = solve(placement, sizes, Budget(total | None, reserved, slot_bytes))

Per mode (free = the budget minus dense weights, KV cache and workspace; None = unlimited):
    gpu          every expert resident; PlacementError when they do not fit
    cpu          no slot; the prompt staging pools (two layers' experts) when they fit
    layers:N     the last Lm - N MoE layers' experts resident (auto: the smallest N that fits, staging
                 included when some layer is on the CPU); staging when it fits beside them
    hot:K        K slots per layer (auto: what is left after staging, per layer, at most E)
    cache, static  one shared pool: the asked size (bytes or slots; static: the profile's hot set), capped by
                 the budget with a warning; auto = everything the budget leaves after staging
    explicit     the given table; 'shared' layers share what is left (as cache:auto)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hotexperts.errors import PlacementError
from hotexperts.experts.budget import Budget, GiB
from hotexperts.experts.placement import Placement, PlacementPlan
from hotexperts.experts.profile import load_profile


@dataclass(frozen=True)
class ModelSizes:
    moe_layers: tuple[int, ...]
    num_experts: int
    slot_bytes: int               # one expert in the slot format (the store's format)
    staging_bytes: int = 0        # the two prompt staging pools; 0 = none wanted
    expert_bytes: int = 0         # every routed expert (the gpu placement's need); 0 = E * Lm * slot_bytes

    @property
    def all_experts(self) -> int:
        return self.expert_bytes or self.num_experts * len(self.moe_layers) * self.slot_bytes


Fits = Callable[[int, int], bool]          # (slots, staging bytes) -> fits the budget


def solve(p: Placement, sizes: ModelSizes, budget: Budget) -> PlacementPlan:
    """The plan for `p` (module doc); PlacementError when the placement cannot fit at all."""
    budget.check_dense_fits()
    free, sb = budget.free_for_experts, sizes.slot_bytes
    fits: Fits = (lambda n, st: True) if free is None else (lambda n, st: n * sb + st <= free)
    solver = {"gpu": _gpu, "cpu": _cpu, "layers": _layers, "hot": _hot, "cache": _pool, "static": _pool,
              "explicit": _explicit}[p.mode]
    where, shared, staging = solver(p, sizes, budget, fits)
    plan = PlacementPlan(where, p, shared, staging, sb)
    if budget.total is None:
        return plan
    slots = sizes.all_experts if plan.dense else plan.num_slots(sizes.num_experts) * sb
    vram = {"total": budget.total, **(budget.parts or {"reserved": budget.reserved}),
            "staging": sizes.staging_bytes if staging else 0, "slots": slots}
    return PlacementPlan(where, p, shared, staging, sb, vram)


def _gpu(p, sizes, budget, fits):
    need, free = sizes.all_experts, budget.free_for_experts
    if free is not None and need > free:
        raise PlacementError(f"all experts on the GPU need {need / GiB:.2f} GiB but the VRAM budget leaves "
                             f"{free / GiB:.2f} GiB; use --n-cpu-moe, --moe-hot-k or --moe-cache")
    return {l: "gpu" for l in sizes.moe_layers}, 0, False


def _cpu(p, sizes, budget, fits):
    return {l: "cpu" for l in sizes.moe_layers}, 0, bool(sizes.staging_bytes) and fits(0, sizes.staging_bytes)


def _layers(p, sizes, budget, fits):
    layers, E, st = sizes.moe_layers, sizes.num_experts, sizes.staging_bytes
    n_cpu = p.n_cpu_layers if p.n_cpu_layers is not None else _auto_n(layers, E, fits, st)
    if not 0 <= n_cpu <= len(layers):
        raise PlacementError(f"--n-cpu-moe must be in [0, {len(layers)}] (MoE layers), got {n_cpu}")
    need = (len(layers) - n_cpu) * E
    if not fits(need, 0):
        raise PlacementError(_too_small(f"--n-cpu-moe {n_cpu}", need, sizes.slot_bytes, budget))
    where = {l: ("cpu" if i < n_cpu else "gpu") for i, l in enumerate(layers)}
    return where, 0, bool(st) and bool(n_cpu) and fits(need, st)


def _auto_n(layers: Sequence[int], E: int, fits: Fits, staging: int) -> int:
    for n in range(len(layers) + 1):
        if fits((len(layers) - n) * E, staging if n else 0):
            return n
    return len(layers)


def _hot(p, sizes, budget, fits):
    layers, E, st = sizes.moe_layers, sizes.num_experts, sizes.staging_bytes
    k = p.hot_k if p.hot_k is not None else _auto_k(sizes, budget)
    need = min(k, E) * len(layers)
    if not fits(need, 0):
        raise PlacementError(_too_small(f"--moe-hot-k {k}", need, sizes.slot_bytes, budget))
    return {l: min(k, E) for l in layers}, 0, bool(st) and fits(need, st)


def _auto_k(sizes: ModelSizes, budget: Budget) -> int:
    """hot:auto: the slots per layer the budget leaves once the prompt staging pools are kept."""
    free = budget.free_for_experts
    if free is None:
        return sizes.num_experts
    st = sizes.staging_bytes
    room = free - (st if free > st else 0)
    return max(0, min(sizes.num_experts, room // sizes.slot_bytes // len(sizes.moe_layers)))


def _pool(p, sizes, budget, fits):
    """cache / static: one shared pool of the requested size, capped by what the VRAM budget leaves."""
    layers, E, sb, st = sizes.moe_layers, sizes.num_experts, sizes.slot_bytes, sizes.staging_bytes
    want = p.cache_slots if p.cache_slots is not None else (
        p.cache_bytes // sb if p.cache_bytes is not None else None)
    if want is None and p.mode == "static":
        want = sum(len(h) for h in load_profile(p.profile, E).hot.values()) or None
        if want is None and budget.free_for_experts is None:
            raise PlacementError(f"the profile {p.profile} lists no hot experts: give a cache size "
                                 "(--moe-cache BUDGET) or a --vram-budget")
    want, staging = _pool_size(want, E * len(layers), sb, st, budget.free_for_experts)
    return {l: "shared" for l in layers}, want, staging


def _pool_size(want: int | None, most: int, sb: int, st: int, free: int | None) -> tuple[int, bool]:
    """(pool slots, staging kept): `want` (None = as many as fit, staging first), capped by `free` bytes
    (None = unlimited), at most `most`."""
    room = None if free is None else max(0, free // sb)
    fits = (lambda n, s: True) if free is None else (lambda n, s: n * sb + s <= free)
    if want is None and room is not None and st <= free:
        want = (free - st) // sb            # "as many slots as fit": keep the prompt staging pools first
    if want is None:
        want = most if room is None else room
    keep = bool(st) and fits(min(want, room if room is not None else want), st)
    if room is not None:
        room = max(0, (free - (st if keep else 0)) // sb)
        if want > room:
            warnings.warn(f"the expert cache is limited to {room} slots by the VRAM budget (asked for "
                          f"{want})", RuntimeWarning, stacklevel=5)
            want = room
    return min(want, most), keep


def _explicit(p, sizes, budget, fits):
    where = _table(p, sizes.moe_layers)
    E, sb, st = sizes.num_experts, sizes.slot_bytes, sizes.staging_bytes
    fixed = E * sum(w == "gpu" for w in where.values()) + sum(w for w in where.values() if isinstance(w, int))
    if not fits(fixed, 0):
        raise PlacementError(_too_small(f"the placement {p.describe()}", fixed, sb, budget))
    n_shared = sum(w == "shared" for w in where.values())
    if n_shared and any(isinstance(w, int) for w in where.values()):
        raise PlacementError(f"{p.describe()} mixes per-layer slots and a shared pool: choose one")
    shared, free = 0, budget.free_for_experts
    if n_shared:
        shared, _ = _pool_size(None, E * n_shared, sb, st, None if free is None else free - fixed * sb)
    can_miss = any(w != "gpu" for w in where.values())
    return where, shared, bool(st) and can_miss and fits(fixed + shared, st)


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


def _too_small(what: str, need: int, sb: int, budget: Budget) -> str:
    free = budget.free_for_experts
    return (f"{what} needs {need} expert slots ({need * sb / GiB:.2f} GiB) but the VRAM budget leaves "
            f"{(free or 0) / GiB:.2f} GiB after the dense weights, KV cache and workspace")
