"""The N-card placement as data: which card holds which part of which expert, one VRAM budget per card, the
CPU computing what no card holds (torch-free, numpy only; executed by experts/shard.py, docs/multi-gpu.md).

    budgets = parse_card_budgets("24,12")                  # -> (24 GiB, 12 GiB) in bytes, one per card
    sizes = ShardSizes(moe_layers, num_experts, intermediate, expert_bytes, top_k, granularity)
    plan = plan_cards(sizes, budgets, reserved=(r0, r1), mode="auto" | "sharded" | "pools",
                      routing={layer: counts[E]} | None, cost=CostInputs(...))
    plan.describe()                                        # printable, one line per card

Both expert layouts give each card a set of resident experts per MoE layer and run the same step: every card
computes the partial output of what it holds, the CPU card (card 0) adds the experts no card holds, and one
all-reduce per MoE layer sums the partials (an exact sum: every expert's every intermediate row is computed
once, on exactly one device).
    sharded   every card holds the same resident experts, card c rows [lo_c, hi_c) of the intermediate dim
              I of each (gate/up rows of w13 [2I, D], columns of w2 [D, I]); the split is proportional to the
              cards' free bytes, in whole groups of `granularity` columns (a quantized w2's scale group)
    pools     every card holds whole experts in a slot pool of its own; each layer's hot experts are dealt
              to the cards in turn, in proportion to their pools
The dense part (attention, router, norms, embedding, head) and the KV cache are replicated on every card:
`reserved[c]` is what they take on card c, charged to its budget (a layer split of the dense part is not
implemented: a card whose budget cannot hold it raises PlacementError).
Which experts are resident: per layer the most routed ones (`routing` counts, e.g. a routing profile; by
default in id order), the same number in every layer.

`mode="auto"` solves both and keeps the one with the lower predicted decode time (`decode_seconds`, the cost
function below); both predictions stay in `plan.cost`.

Cost of one decode token (`decode_seconds`), from named, measurable inputs (`CostInputs`):
    per MoE layer and sampled token (top_k experts drawn from the layer's routing frequencies, Gumbel top-k,
    `samples` draws, fixed seed):
        card_c  = bytes card c reads / card_bytes_per_s[c] (+ launch_s when it holds any of them)
                  sharded: hits * slice_bytes_c / shard_efficiency   pools: hits_on_c * expert_bytes
        cpu     = misses * expert_bytes / cpu_bytes_per_s
        layer   = max(max_c card_c, cpu) + all_reduce_s
    decode_seconds = sum over layers of the mean over samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hotexperts.errors import PlacementError
from hotexperts.experts.budget import GiB, MiB, parse_bytes

MODES = ("auto", "sharded", "pools")


def parse_card_budgets(text: str | None, cards: int | None = None) -> tuple[int | None, ...]:
    """'24,12' -> (24 GiB, 12 GiB): one VRAM budget per card, in card order (bare numbers are GiB, units
    as --vram-budget). One value with `cards` = N -> that budget on each of N cards; None or 'none' ->
    unlimited on each card. A count that disagrees with `cards` raises PlacementError."""
    if text is None or str(text).strip().lower() in ("", "none"):
        if cards is None:
            raise PlacementError("no --vram-budget and no card count: give one budget per card, e.g. 24,12")
        return (None,) * cards
    items = [t.strip() for t in str(text).split(",")]
    if any(not t for t in items):
        raise PlacementError(f"cannot read the per-card budgets {text!r}: use e.g. '24,12' (GiB per card)")
    budgets = tuple(parse_bytes(t) for t in items)
    if cards is not None and len(budgets) == 1:
        budgets = budgets * cards
    if cards is not None and len(budgets) != cards:
        raise PlacementError(f"--vram-budget {text!r} names {len(budgets)} card(s) but {cards} are used: "
                             "give one budget, or one per card")
    if any(b <= 0 for b in budgets):
        raise PlacementError(f"every card's budget must be positive, got {text!r}")
    return budgets


@dataclass(frozen=True)
class ShardSizes:
    moe_layers: tuple[int, ...]
    num_experts: int
    intermediate: int             # I: rows of gate (and of up) per expert, columns of down
    expert_bytes: int             # one whole expert in the store's format
    top_k: int
    granularity: int = 1          # I may be cut only at multiples of this (a quantized w2's column group)

    def __post_init__(self):
        if self.granularity < 1 or self.intermediate % self.granularity:
            raise PlacementError(f"the intermediate size {self.intermediate} is not a multiple of the "
                                 f"expert format's column group {self.granularity}: it cannot be sharded")


@dataclass(frozen=True)
class CostInputs:
    """The cost function's named inputs (module doc): measured rates, or these stated estimates."""

    card_bytes_per_s: float | tuple[float, ...] = 2.0e12   # expert GEMV read rate of each card (H100 HBM3)
    cpu_bytes_per_s: float = 40e9          # CPU expert compute rate (experts/build.py CPU_BYTES_PER_S)
    launch_s: float = 8e-6                 # a card's fixed cost per MoE layer it computes on (launches)
    all_reduce_s: float = 15e-6            # one all-reduce of a decode step's [1, D] partial output
    shard_efficiency: float = 1.0          # read rate of a 1/N expert slice relative to a whole expert
    samples: int = 256
    seed: int = 0

    def card_rate(self, card: int) -> float:
        rates = self.card_bytes_per_s
        return float(rates[card] if isinstance(rates, tuple) else rates)


@dataclass(frozen=True)
class CardPart:
    """One card's share: its budget and dense reservation (bytes), the intermediate rows [lo, hi) it holds
    of each of its experts, its experts per MoE layer, and the bytes one of its expert slices takes."""

    card: int
    budget: int | None
    reserved: int
    rows: tuple[int, int]
    experts: Mapping[int, tuple[int, ...]]
    slice_bytes: int

    @property
    def slots(self) -> int:
        return sum(len(ids) for ids in self.experts.values())

    @property
    def expert_total(self) -> int:
        return self.slots * self.slice_bytes

    def describe(self, intermediate: int) -> str:
        lo, hi = self.rows
        per = sorted({len(ids) for ids in self.experts.values()}) or [0]
        rows = "whole experts" if (lo, hi) == (0, intermediate) else f"rows {lo}-{hi - 1} of {intermediate}"
        budget = "unlimited" if self.budget is None else _size(self.budget)
        return (f"card {self.card}: budget {budget}: dense+KV+workspace {_size(self.reserved)} + experts "
                f"{_size(self.expert_total)} ({self.slots} slots x {_size(self.slice_bytes)}, "
                f"{'/'.join(map(str, per))} per layer, {rows})")


@dataclass(frozen=True)
class MultiPlan:
    mode: str                                  # "sharded" | "pools"
    cards: tuple[CardPart, ...]
    num_experts: int
    intermediate: int
    moe_layers: tuple[int, ...]
    cpu_card: int = 0                          # the card whose process computes the CPU's experts
    dense: str = "replicated"
    cost: dict = field(default_factory=dict)   # mode -> predicted decode seconds per token

    def resident(self, layer: int) -> tuple[int, ...]:
        """Experts of `layer` some card holds (sorted)."""
        return tuple(sorted({e for c in self.cards for e in c.experts.get(layer, ())}))

    def cpu_experts(self, layer: int) -> tuple[int, ...]:
        """Experts of `layer` no card holds: the CPU card computes them."""
        held = set(self.resident(layer))
        return tuple(e for e in range(self.num_experts) if e not in held)

    def text(self) -> str:
        """One line: the layout, the row split or pool sizes, residency per layer."""
        n = len(self.moe_layers)
        on_cards = sum(len(self.resident(l)) for l in self.moe_layers) / max(1, n)
        split = "|".join(f"{c.rows[0]}-{c.rows[1] - 1}" if c.rows[1] > c.rows[0] else "-" for c in self.cards)
        what = f"rows {split}" if self.mode == "sharded" else "pools " + "|".join(
            str(c.slots) for c in self.cards)
        return (f"{self.mode} x{len(self.cards)} ({what}): {on_cards:g}/{self.num_experts} experts per layer "
                f"on the cards, the rest on the CPU (card {self.cpu_card}); dense {self.dense}")

    def describe(self) -> str:
        lines = [f"placement {self.text()}"]
        lines += ["  " + c.describe(self.intermediate) for c in self.cards]
        if self.cost:
            lines.append("  predicted decode: " + ", ".join(
                f"{m} {s * 1e3:.3f} ms/token" for m, s in self.cost.items()))
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


# ---- solving ---------------------------------------------------------------------------------------------
def plan_cards(sizes: ShardSizes, budgets: Sequence[int | None], reserved: Sequence[int], *,
               mode: str = "auto", routing: Mapping[int, Sequence[float]] | None = None,
               cost: CostInputs = CostInputs()) -> MultiPlan:
    """The plan over len(budgets) cards (module doc); PlacementError when the dense part does not fit."""
    if mode not in MODES:
        raise PlacementError(f"the multi-card mode must be one of {', '.join(MODES)}, got {mode!r}")
    if len(reserved) != len(budgets) or not budgets:
        raise PlacementError(f"{len(budgets)} budget(s) for {len(reserved)} card(s): give one per card")
    free = _free_per_card(budgets, reserved)
    freq = _frequencies(sizes, routing)
    plans = {m: solver(sizes, budgets, reserved, free, freq) for m, solver in
             (("sharded", _sharded), ("pools", _pools)) if mode in ("auto", m)}
    costs = {m: decode_seconds(p, sizes, freq, cost) for m, p in plans.items()}
    best = min(costs, key=costs.get)
    return MultiPlan(best, plans[best].cards, sizes.num_experts, sizes.intermediate, sizes.moe_layers,
                     cost=costs)


def _free_per_card(budgets, reserved) -> list[int | None]:
    if len({b is None for b in budgets}) > 1:
        raise PlacementError("give every card a budget, or none of them")
    free = []
    for c, (b, r) in enumerate(zip(budgets, reserved, strict=True)):
        if b is not None and b < r:
            raise PlacementError(
                f"card {c}'s budget ({b / GiB:.2f} GiB) is smaller than its replicated dense weights, KV "
                f"cache and workspace ({r / GiB:.2f} GiB); raise it or shorten the context (a layer split "
                "of the dense part is not implemented)")
        free.append(None if b is None else b - r)
    return free


def _frequencies(sizes: ShardSizes, routing) -> dict[int, np.ndarray]:
    """Per layer the routing share of each expert (sums to 1); uniform where no counts are given."""
    E, out = sizes.num_experts, {}
    for l in sizes.moe_layers:
        counts = np.ones(E) if routing is None or l not in routing else np.asarray(routing[l], dtype=float)
        if counts.shape != (E,) or (counts < 0).any() or counts.sum() <= 0:
            raise PlacementError(f"routing counts of layer {l} must be {E} non-negative numbers, not all 0")
        out[l] = counts / counts.sum()
    return out


def _hot(freq: np.ndarray, n: int) -> list[int]:
    """The n most routed experts, ties in id order."""
    return [int(e) for e in np.argsort(-freq, kind="stable")[:n]]


def _sharded(sizes, budgets, reserved, free, freq) -> MultiPlan:
    """The most experts per layer whose row slices fit every card, rows split in proportion to free bytes."""
    n = sizes.intermediate // sizes.granularity               # indivisible column groups per expert
    per_group = sizes.expert_bytes / n                        # bytes of one group of one expert
    layers, E = sizes.moe_layers, sizes.num_experts

    def caps(resident: int) -> list[int]:
        if resident == 0:
            return [n] * len(free)
        return [n if f is None else min(n, int(f // (resident * len(layers) * per_group))) for f in free]

    resident = max((r for r in range(E + 1) if sum(caps(r)) >= n), default=0)
    groups = _split(n, caps(resident), [1.0 if f is None else float(f) for f in free])
    cards, lo = [], 0
    for c, g in enumerate(groups):
        hi = lo + g * sizes.granularity
        ids = {l: tuple(sorted(_hot(freq[l], resident))) for l in layers} if g else {}
        cards.append(CardPart(c, budgets[c], reserved[c], (lo, hi), ids, -(-sizes.expert_bytes * g // n)))
        lo = hi
    return MultiPlan("sharded", tuple(cards), E, sizes.intermediate, layers)


def _split(n: int, caps: Sequence[int], weights: Sequence[float]) -> list[int]:
    """n units over the cards in proportion to `weights`, at most caps[c] each (sum(caps) >= n)."""
    total = sum(w for w, cap in zip(weights, caps, strict=True) if cap) or 1.0
    share = [min(cap, int(n * w / total)) for w, cap in zip(weights, caps, strict=True)]
    while sum(share) < n:
        room = [c for c in range(len(caps)) if share[c] < caps[c]]
        c = max(room, key=lambda c: (n * weights[c] / total - share[c], -c))
        share[c] += 1
    return share


def _pools(sizes, budgets, reserved, free, freq) -> MultiPlan:
    """Whole experts in per-card pools: quota per layer = the card's slots / MoE layers; each layer's hot
    experts dealt to the card with the largest unused share of its quota."""
    layers, E, eb = sizes.moe_layers, sizes.num_experts, sizes.expert_bytes
    quota = [E if f is None else int(f // eb) // len(layers) for f in free]
    while sum(quota) > E:                                     # more room than experts: trim the largest
        quota[quota.index(max(quota))] -= 1
    dealt = _deal(quota)
    held: list[dict[int, tuple[int, ...]]] = [{} for _ in quota]
    for l in layers:
        hot = _hot(freq[l], sum(quota))
        for c in range(len(quota)):
            ids = tuple(sorted(e for e, owner in zip(hot, dealt, strict=True) if owner == c))
            if ids:
                held[c][l] = ids
    I = sizes.intermediate
    cards = tuple(CardPart(c, budgets[c], reserved[c], (0, I), held[c], eb) for c in range(len(quota)))
    return MultiPlan("pools", cards, E, I, layers)


def _deal(quota: Sequence[int]) -> list[int]:
    """The card of each hot rank (hottest first): the card with the largest unused fraction of its quota."""
    used, order = [0] * len(quota), []
    for _ in range(sum(quota)):
        c = max((c for c in range(len(quota)) if used[c] < quota[c]),
                key=lambda c: ((quota[c] - used[c]) / quota[c], -c))
        used[c] += 1
        order.append(c)
    return order


# ---- the cost function -----------------------------------------------------------------------------------
def decode_seconds(plan: MultiPlan, sizes: ShardSizes, freq: Mapping[int, np.ndarray],
                   cost: CostInputs = CostInputs()) -> float:
    """Predicted seconds of one decode token's routed experts under `plan` (module doc)."""
    rng = np.random.default_rng(cost.seed)
    total = 0.0
    for l in sizes.moe_layers:
        picks = _sample_topk(rng, freq[l], sizes.top_k, cost.samples)              # [S, K] expert ids
        card_s = np.stack([_card_seconds(c, l, picks, plan.mode, sizes, cost) for c in plan.cards])  # [C, S]
        cold = np.isin(picks, plan.cpu_experts(l)).sum(axis=1)                    # [S]
        cpu_s = cold * sizes.expert_bytes / cost.cpu_bytes_per_s
        total += float(np.maximum(card_s.max(axis=0), cpu_s).mean()) + cost.all_reduce_s
    return total


def _card_seconds(card: CardPart, layer: int, picks: np.ndarray, mode: str, sizes: ShardSizes,
                  cost: CostInputs) -> np.ndarray:
    """[S] seconds card `card` spends on each sampled token's experts of `layer`."""
    hits = np.isin(picks, card.experts.get(layer, ())).sum(axis=1)                 # [S]
    if mode == "sharded":
        read = hits * card.slice_bytes / cost.shard_efficiency
    else:
        read = hits * sizes.expert_bytes
    return read / cost.card_rate(card.card) + np.where(hits > 0, cost.launch_s, 0.0)


def _sample_topk(rng: np.random.Generator, p: np.ndarray, k: int, samples: int) -> np.ndarray:
    """[samples, k] expert ids drawn without replacement in proportion to p (Gumbel top-k)."""
    with np.errstate(divide="ignore"):
        keys = np.log(p)[None, :] + rng.gumbel(size=(samples, p.size))
    k = min(k, int((p > 0).sum()))
    return np.argpartition(-keys, k - 1, axis=1)[:, :k]
