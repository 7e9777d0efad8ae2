"""Hardware profiles for the cost model (numpy-free, torch-free): built-in estimates and calibrated JSON.

    HardwareProfile      frozen dataclass; every rate in GB/s (1e9 bytes/s), every time in seconds
    BUILTIN              name -> HardwareProfile ("rtx4090-7950x", "rtx3060-ddr4", "h200")
    get_profile(name_or_path) -> HardwareProfile        (built-in name, or a JSON file from `calibrate`)
    save_hardware(path, hw) / load_hardware(path)

Built-in figures are labelled "estimate": vendor peaks derated to typical achieved rates, except the h200
entries taken from ../shared/MACHINE.md (measured 2026-11-28). `hotexperts calibrate` replaces estimates
with this machine's measurements.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from hotexperts.errors import HotExpertsError, read_json


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    label: str                      # "estimate" | "measured" | "calibrated"
    vram_gb: float
    gpu_hbm_gbs: float              # achieved GPU memory bandwidth
    gpu_tflops: float               # achieved bf16 matmul throughput (prompt batches)
    gpu_layer_overhead_s: float     # fixed GPU time per decoder layer per decode token (launches)
    gpu_moe_launch_s: float         # one fused expert kernel over the hit slots
    h2d_gbs: float                  # pinned host -> device copy
    sync_s: float                   # per layer with CPU work: D2H ids/x, wait, H2D partial, add
    cpu_read_gbs: float             # plain streaming read of host memory
    cpu_expert_gbs: dict = field(default_factory=dict)   # format -> GB/s of weights the CPU kernel reads
    cpu_call_s: float = 20e-6       # fixed cost of one CPU MoE call (one per layer with misses)
    cpu_tflops: float = 1.0         # CPU expert matmul throughput for prompt batches
    notes: str = ""

    def cpu_gbs(self, fmt: str) -> float:
        if fmt in self.cpu_expert_gbs:
            return float(self.cpu_expert_gbs[fmt])
        return float(self.cpu_read_gbs) * 0.5          # unknown format: half the plain read rate

    def to_dict(self) -> dict:
        return asdict(self)


BUILTIN = {
    "rtx4090-7950x": HardwareProfile(
        "rtx4090-7950x", "estimate", vram_gb=24.0, gpu_hbm_gbs=900.0, gpu_tflops=150.0,
        gpu_layer_overhead_s=15e-6, gpu_moe_launch_s=6e-6, h2d_gbs=25.0, sync_s=30e-6, cpu_read_gbs=65.0,
        cpu_expert_gbs={"bf16": 35.0, "int8": 55.0, "int4": 45.0}, cpu_call_s=10e-6, cpu_tflops=1.5,
        notes="RTX 4090 (1008 GB/s GDDR6X) + Ryzen 9 7950X, DDR5-6000 dual channel, PCIe 4.0 x16"),
    "rtx3060-ddr4": HardwareProfile(
        "rtx3060-ddr4", "estimate", vram_gb=12.0, gpu_hbm_gbs=320.0, gpu_tflops=25.0,
        gpu_layer_overhead_s=20e-6, gpu_moe_launch_s=8e-6, h2d_gbs=20.0, sync_s=35e-6, cpu_read_gbs=38.0,
        cpu_expert_gbs={"bf16": 20.0, "int8": 32.0, "int4": 28.0}, cpu_call_s=12e-6, cpu_tflops=0.6,
        notes="RTX 3060 12 GB (360 GB/s) + 8-core AVX2 desktop, DDR4-3200 dual channel, PCIe 4.0 x16"),
    "h200": HardwareProfile(
        "h200", "estimate", vram_gb=141.0, gpu_hbm_gbs=4300.0, gpu_tflops=700.0,
        gpu_layer_overhead_s=40e-6, gpu_moe_launch_s=10e-6, h2d_gbs=55.0, sync_s=77e-6, cpu_read_gbs=77.0,
        cpu_expert_gbs={"bf16": 48.0, "int8": 125.0, "int4": 59.0}, cpu_call_s=20e-6, cpu_tflops=4.0,
        notes="H200 + 16-core Xeon (AMX): bandwidths, H2D and sync from shared/MACHINE.md (sync = "
              "(8.4-4.7) ms / 48 layers, plain PyTorch); GPU overhead and TFLOPS estimated"),
}


def get_profile(name_or_path: str) -> HardwareProfile:
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return load_hardware(path)
    raise HotExpertsError(f"unknown hardware profile {name_or_path!r}: use one of {', '.join(BUILTIN)} "
                          f"or a JSON file written by `hotexperts calibrate`")


def save_hardware(path: str | Path, hw: HardwareProfile) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": "hotexperts-hardware", "version": 1} | hw.to_dict(), indent=1))
    return path


def load_hardware(path: str | Path) -> HardwareProfile:
    path = Path(path)
    doc = read_json(path, "hardware profile")
    if not isinstance(doc, dict) or doc.get("format") != "hotexperts-hardware":
        raise HotExpertsError(f"{path} is not a hotexperts hardware profile (run `hotexperts calibrate`)")
    base = BUILTIN.get(str(doc.get("base", "")), BUILTIN["h200"])
    known = {f.name for f in fields(HardwareProfile)}
    values = {k: v for k, v in doc.items() if k in known}
    return replace(base, **values)
