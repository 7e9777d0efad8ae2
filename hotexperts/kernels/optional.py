"""Triton kernel modules are optional: `triton_module(name)` imports hotexperts.kernels.<name> once and
returns it, or None when it cannot be imported (no Triton, an unsupported platform); callers then take their
torch path. The import happens on first use, not at start-up (Triton is heavy and may be absent)."""

from __future__ import annotations

import importlib
from functools import cache


@cache
def triton_module(name: str):
    try:
        return importlib.import_module(f"hotexperts.kernels.{name}")
    except Exception:  # noqa: BLE001 - any import failure means "no Triton here"
        return None
