"""Placement as data: what the user asks for (`Placement`, one text grammar) and the solved per-layer table
(`PlacementPlan`: for every MoE layer gpu | cpu | slots(K) | shared, plus the policy) that the executor runs.

Grammar (`Placement.parse(text)`; every placement flag and every bench name is sugar for it):
    gpu | cpu                     every MoE layer's experts on the GPU / on the CPU      (--experts gpu|cpu,
                                                                                          --cpu-moe)
    layers:N | layers:auto        experts of the first N MoE layers on the CPU, the rest on the GPU
                                  (llama.cpp --n-cpu-moe N; auto: the smallest N that fits the budget)
    hot:K | hot:auto              K slots per MoE layer, policy window-lfu (the seed's design; auto: as many
                                  as the budget leaves per layer)                       (--moe-hot-k K)
    cache[:SIZE[:POLICY]]         one slot pool shared by all MoE layers; SIZE '8GiB' | '8' (GiB) |
                                  '2000slots' | 'auto' (what the budget leaves); policy auto by default
                                                                                        (--moe-cache SIZE)
    static:FILE                   a fixed hot set from a routing profile                (--moe-profile FILE)
    RANGE=WHERE[,RANGE=WHERE...]  explicit: RANGE is 'all', 'L' or 'L-M' (decoder-layer indices; later items
                                  win), WHERE is 'gpu', 'cpu', 'slotsK' or 'shared' (the pool sized by the
                                  budget); every MoE layer must be covered
  Suffixes: '@POLICY' (lru | window-lfu | decay | static | auto) and '+zN' (decode: the GPU computes up to N
  misses per layer itself from pinned RAM, --moe-gpu-misses N).
  Bench names (`hotexperts bench --placements`): cpu-moe = cpu, n-cpu-moe = layers:auto, hot = hot:auto,
  cache = cache:auto.

`solve` (experts/solve.py) turns a Placement into a PlacementPlan against one VRAM budget; `plan.text()`
prints it in the explicit form (`0-11=cpu,12-47=gpu`, `all=slots16@window-lfu`, `all=shared@auto`) and
`plan.describe()` adds the slot counts and the VRAM breakdown. experts/build.py builds the executor from a
plan. The other fields of a Placement are the cache's knobs; exactness with --expert-quant is against the
quantized reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hotexperts.errors import PlacementError
from hotexperts.experts.budget import GiB, parse_cache
from hotexperts.formats import EXPERT_QUANT, EXPERT_QUANT_CHOICES

MODES = ("gpu", "cpu", "layers", "hot", "cache", "static", "explicit")
DECODE = ("auto", "worker", "sync")
ALIASES = {"cpu-moe": "cpu", "n-cpu-moe": "layers:auto", "hot": "hot:auto", "cache": "cache:auto"}
WHERE = re.compile(r"^(gpu|cpu|shared|slots(\d+))$")
LayerMap = tuple[tuple[int | None, int | None, str], ...]     # (first, last | None = all, where)


@dataclass(frozen=True)
class Placement:
    mode: str = "gpu"
    n_cpu_layers: int | None = None          # layers: None = auto
    hot_k: int | None = 0                    # hot: None = auto
    cache_bytes: int | None = None           # cache: budget in bytes, or
    cache_slots: int | None = None           # ... in slots; both None = what the VRAM budget leaves
    layer_map: LayerMap = ()                 # explicit: RANGE=WHERE items in order
    policy: str | None = None                # lru | window-lfu | decay | static | auto (default per mode)
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
        if self.expert_quant not in EXPERT_QUANT:
            raise PlacementError(f"--expert-quant must be one of {', '.join(EXPERT_QUANT_CHOICES)}, "
                                 f"got {self.expert_quant!r}")
        if self.decode not in DECODE:
            raise PlacementError(f"--moe-decode must be one of {', '.join(DECODE)}, got {self.decode!r}")
        if self.gpu_misses is not None and self.gpu_misses < 0:
            raise PlacementError(f"--moe-gpu-misses must be >= 0, got {self.gpu_misses}")
        if self.mode == "static" and not self.profile:
            raise PlacementError("a static placement needs a routing profile (--moe-profile FILE)")
        if self.mode == "hot" and self.hot_k is not None and self.hot_k < 0:
            raise PlacementError(f"--moe-hot-k must be >= 0, got {self.hot_k}")

    @classmethod
    def parse(cls, text: str, **overrides) -> Placement:
        """The grammar in the module doc -> a Placement (overrides: any other field, e.g. pp_bypass=4)."""
        body, z = _suffix(str(text).strip(), "+z")
        body, pol = _suffix(body, "@")
        if any(c in pol for c in ",=:"):
            raise PlacementError(f"cannot read the placement {text!r}: '@POLICY' ends the whole placement "
                                 f"(one policy for every managed layer), e.g. {_policy_last(text)!r}")
        body = ALIASES.get(body.lower(), body)
        kw = _mode_fields(body, text)
        if pol:
            kw["policy"] = pol
        if z:
            kw["gpu_misses"] = _int(z, "+zN")
        return cls(**{**kw, **overrides})

    def describe(self) -> str:
        """This request in the grammar (round-trips through parse)."""
        arg = {"layers": "auto" if self.n_cpu_layers is None else self.n_cpu_layers,
               "hot": "auto" if self.hot_k is None else self.hot_k, "static": self.profile,
               "cache": self._cache_text()}.get(self.mode)
        text = _map_text(self.layer_map) if self.mode == "explicit" else (
            self.mode if arg is None else f"{self.mode}:{arg}")
        if self.mode == "explicit" and self.policy:
            text += f"@{self.policy}"
        return text + (f"+z{self.gpu_misses}" if self.gpu_misses else "")

    def _cache_text(self) -> str:
        if self.cache_slots is not None:
            return f"{self.cache_slots}slots"
        text = "auto" if self.cache_bytes is None else f"{self.cache_bytes / GiB:g}GiB"
        return text + (f":{self.policy}" if self.policy else "")

    @property
    def default_policy(self) -> str:
        """The policy of the managed layers: the asked one, else static (a profile alone), window-lfu
        (per-layer slots), auto (a shared pool)."""
        if self.policy is not None:
            return self.policy
        if self.mode == "static":
            return "static"
        per_layer = self.mode == "hot" or any(w.startswith("slots") for _, _, w in self.layer_map)
        return "window-lfu" if per_layer else "auto"


def _policy_last(text: str) -> str:
    """'2=slots4@lru,3=cpu' -> '2=slots4,3=cpu@lru' (the form the grammar reads)."""
    head, _, tail = text.partition("@")
    pol, sep, rest = tail.partition(",")
    return f"{head}{sep}{rest}@{pol}"


def _suffix(text: str, mark: str) -> tuple[str, str]:
    """('cache:auto', '2') from 'cache:auto+z2' (mark '+z'); policies follow '@'."""
    head, sep, tail = text.rpartition(mark)
    return (head, tail) if sep and head else (text, "")


def _mode_fields(body: str, original: str) -> dict:
    if "=" in body:
        return {"mode": "explicit", "layer_map": parse_layer_map(body)}
    mode, _, arg = body.partition(":")
    mode = mode.strip().lower()
    if mode == "layers":
        return {"mode": mode, "n_cpu_layers": None if arg in ("", "auto") else _int(arg, "layers:N")}
    if mode == "hot":
        return {"mode": mode, "hot_k": None if arg == "auto" else _int(arg, "hot:K")}
    if mode == "cache":
        size, _, pol = arg.partition(":")
        kw = {"mode": mode, "policy": pol or None}
        if size and size != "auto":
            kw["cache_bytes"], kw["cache_slots"] = parse_cache(size)
        return kw
    if mode == "static":
        return {"mode": mode, "profile": arg or None}
    if mode not in ("gpu", "cpu") or arg:
        raise PlacementError(f"cannot read the placement {original!r}: use gpu, cpu, layers:N, hot:K, "
                             "cache:BUDGET, static:FILE or RANGE=WHERE,... (e.g. 0-11=cpu,12-47=gpu)")
    return {"mode": mode}


def parse_layer_map(text: str) -> LayerMap:
    """'0-11=cpu,12-47=gpu' -> ((0, 11, 'cpu'), (12, 47, 'gpu')); 'all' -> (None, None, ...)."""
    items = []
    for item in text.split(","):
        rng, _, where = item.strip().partition("=")
        where = where.strip().lower()
        if not WHERE.match(where):
            raise PlacementError(f"cannot read {item!r}: a layer goes to gpu, cpu, slotsK or shared")
        items.append((*_range(rng.strip(), item), where))
    return tuple(items)


def _range(rng: str, item: str) -> tuple[int | None, int | None]:
    if rng == "all":
        return None, None
    lo, sep, hi = rng.partition("-")
    a = _int(lo, f"layer range in {item!r}")
    b = _int(hi, f"layer range in {item!r}") if sep else a
    if b < a or a < 0:
        raise PlacementError(f"layer range {rng!r} in {item!r} is empty or negative")
    return a, b


def _map_text(layer_map: LayerMap) -> str:
    return ",".join(f"{'all' if a is None else (a if a == b else f'{a}-{b}')}={w}" for a, b, w in layer_map)


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PlacementError(f"{what}: expected an integer, got {text!r}") from None


# ---- the solved plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Staging:
    """The prompt staging pools a plan keeps: `pools` device pools (0 or 2, the double buffer) of `experts`
    experts each (a whole layer when experts == E; fewer: a layer streams in ceil(missing / experts) parts).
    No pools: prompt batches take the hybrid path (CPU experts), and `why` says why; `tight`: because the
    budget left too little (a smaller workspace may give them room)."""

    pools: int = 0
    experts: int = 0
    why: str = ""
    tight: bool = False

    def __bool__(self) -> bool:
        return self.pools > 0 and self.experts > 0

    def nbytes(self, slot_bytes: int) -> int:
        return self.pools * self.experts * slot_bytes if self else 0

    def describe(self, num_experts: int | None = None) -> str:
        if not self:
            return f"no prompt staging ({self.why})" if self.why else "no prompt staging"
        whole = num_experts is not None and self.experts >= num_experts
        return f"staging {self.pools} pools x {'a whole layer' if whole else f'{self.experts} experts'}"


@dataclass(frozen=True)
class PlacementPlan:
    """Where each MoE layer's experts live: where[layer] is "gpu" (every expert in a slot, fixed), "cpu"
    (none), an int K (K slots of its own, managed by the policy) or "shared" (a share of one pool of
    `shared_slots`, managed). staging: the prompt staging pools kept (Staging; falsy = none).
    dequant_chunk: experts a quantized prompt batch dequantizes at a time (0 = the kernel's default).
    prefill_chunk: the prompt chunk the workspace was sized for, where the caller records it.
    notes: what the caller chose around the plan and why (the prompt chunk, the cuBLAS workspace), printed.
    vram: the breakdown in bytes (experts/solve.py: context, dense, kv, workspace (the dequantize chunk
    included), staging, slots; total None when unlimited)."""

    where: dict[int, int | str]
    placement: Placement = field(default_factory=Placement)
    shared_slots: int = 0
    staging: Staging = field(default_factory=Staging)
    slot_bytes: int = 0
    vram: dict = field(default_factory=dict)
    dequant_chunk: int = 0
    prefill_chunk: int = 0        # the prompt chunk its workspace was sized for (0 = not recorded)
    notes: tuple[str, ...] = ()   # the caller's choices around the plan (engine.plan_prefill_chunk)

    def layers(self, kind: str) -> list[int]:
        """MoE layers whose value is `kind` ("gpu", "cpu", "shared", or "slots" for the int ones)."""
        if kind == "slots":
            return [l for l, w in self.where.items() if isinstance(w, int)]
        return [l for l, w in self.where.items() if w == kind]

    @property
    def all_gpu(self) -> bool:
        return all(w == "gpu" for w in self.where.values())

    @property
    def dense(self) -> bool:
        """Run by the all-GPU executor (no slot table, no CPU side): the `gpu` placement, or an explicit
        table with every layer on the GPU. Layer offload that happens to fit everything (layers:0) stays a
        slot cache, as it is asked to be one."""
        return self.all_gpu and self.placement.mode in ("gpu", "explicit")

    @property
    def managed(self) -> list[int]:
        """Layers the policy manages (slots of their own or the shared pool)."""
        return [l for l, w in self.where.items() if isinstance(w, int) or w == "shared"]

    @property
    def slot_layers(self) -> list[int]:
        """Layers the slot cache covers (every layer that may hold an expert on the GPU)."""
        return [l for l, w in self.where.items() if w != "cpu"]

    def num_slots(self, num_experts: int) -> int:
        per = sum(w for w in self.where.values() if isinstance(w, int))
        return num_experts * len(self.layers("gpu")) + per + self.shared_slots

    @property
    def policy(self) -> str | None:
        return self.placement.default_policy if self.managed else None

    def text(self) -> str:
        """The plan in the explicit grammar: consecutive layers with the same place grouped."""
        groups: list[list] = []
        for l, w in self.where.items():
            w = f"slots{w}" if isinstance(w, int) else w
            if groups and groups[-1][2] == w and groups[-1][1] + 1 == l:
                groups[-1][1] = l
            else:
                groups.append([l, l, w])
        if len(groups) == 1:
            text = f"all={groups[0][2]}"
        else:
            text = ",".join(f"{a}={w}" if a == b else f"{a}-{b}={w}" for a, b, w in groups)
        return text + (f"@{self.policy}" if self.policy else "")

    def describe(self) -> str:
        """One line: the plan, its slot count, the prompt staging and the VRAM breakdown."""
        line = f"placement {self.text()}"
        if self.shared_slots:
            line += f" (shared pool of {self.shared_slots} slots)"
        line += f"; {self.staging.describe()}"
        if self.vram:
            parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.vram.items() if k != "total")
            total = self.vram.get("total")
            line += f"; VRAM GiB: total {'unlimited' if total is None else f'{total / GiB:.2f}'} = {parts}"
        return "; ".join((line, *self.notes))
