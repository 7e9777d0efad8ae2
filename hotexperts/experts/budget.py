"""VRAM accounting: what the dense part, KV cache and workspace take, and how many expert slots are left.

One budget covers everything the process holds on the GPU, as a user's card counts it:
    total = reserved (CUDA context + dense weights + KV cache + activation workspace)
            + dequantize chunk + staging (prompt streaming) + slots * slot_bytes   (experts/solve.py sizes
              the last three)
`parse_bytes("8GiB" | "8" | "512MiB")` -> bytes (a bare number means GiB);
`parse_cache("2000slots")` -> slots. Torch-free: the cost model and the simulator size real models with it;
`auto_budget` (free VRAM of a device) is in experts/build.py and `solve` (the plan) in experts/solve.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hotexperts.errors import PlacementError

GiB = 1024 ** 3
MiB = 1024 ** 2
_UNITS = {"": GiB, "g": GiB, "gb": 10 ** 9, "gib": GiB, "m": MiB, "mb": 10 ** 6, "mib": MiB, "b": 1}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | float | int) -> int:
    """'8GiB', '8', '7.5', '512MiB', '8GB' -> bytes (bare numbers are GiB)."""
    if isinstance(text, int | float):
        return int(float(text) * GiB)
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise PlacementError(f"cannot read the size {text!r}: use GiB like '8GiB' or '8', "
                             "or MiB like '512MiB'")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_cache(text: str) -> tuple[int | None, int | None]:
    """--moe-cache value -> (bytes, None) or (None, slots) for '2000slots'."""
    t = str(text).strip().lower()
    if t.endswith("slots") or t.endswith("slot"):
        num = t.removesuffix("s").removesuffix("slot").strip()
        if not num.isdigit():
            raise PlacementError(f"cannot read the cache size {text!r}: use e.g. '2000slots' or '8GiB'")
        return None, int(num)
    return parse_bytes(t), None


@dataclass(frozen=True)
class Budget:
    total: int | None          # bytes the process may use on the GPU, CUDA context included (None: no limit)
    reserved: int              # CUDA context + dense weights + KV cache + workspace
    slot_bytes: int            # one expert in the slot format (matches the store's format)
    parts: dict = field(default_factory=dict, compare=False)   # reserved's breakdown, for reports

    @property
    def free_for_experts(self) -> int | None:
        return None if self.total is None else self.total - self.reserved

    def check_dense_fits(self) -> None:
        free = self.free_for_experts
        if free is not None and free < 0:
            raise PlacementError(
                f"the VRAM budget ({self.total / GiB:.2f} GiB) is smaller than the CUDA context, dense "
                f"weights, KV cache and workspace ({self.reserved / GiB:.2f} GiB{_parts(self.parts)}); raise "
                "--vram-budget or shorten the context")

    def slots_available(self, staging_bytes: int = 0) -> int | None:
        """Slots that fit after the dense part and `staging_bytes`; None when unlimited."""
        self.check_dense_fits()
        free = self.free_for_experts
        if free is None:
            return None
        return max(0, (free - staging_bytes) // max(1, self.slot_bytes))

    def describe(self, slots: int) -> str:
        tot = "unlimited" if self.total is None else f"{self.total / GiB:.2f} GiB"
        return (f"VRAM budget {tot}: dense+KV+workspace {self.reserved / GiB:.2f} GiB, "
                f"{slots} slots x {self.slot_bytes / MiB:.1f} MiB = {slots * self.slot_bytes / GiB:.2f} GiB")


def _parts(parts: dict) -> str:
    return (": " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items())) if parts else ""
