"""Hardware profiles for the cost model (numpy-free, torch-free): built-in estimates and calibrated JSON.

    HardwareProfile      frozen dataclass; every rate in GB/s (1e9 bytes/s), every time in seconds
    BUILTIN              name -> HardwareProfile ("rtx4090-7950x", "rtx3060-ddr4", "h200", "h200-run5")
    get_profile(name_or_path) -> HardwareProfile        (built-in name, or a JSON file from `calibrate`)
    save_hardware(path, hw) / load_hardware(path)
    published(profile, placement) -> {"tg_tps", "what", "url"} | None   stock llama.cpp figures, cited

The consumer profiles are estimates (vendor peaks derated; decode terms scaled from the h200 fit). The
h200 is measured and fitted: bandwidths from ../shared/MACHINE.md, decode terms fitted on H200 run 7
(h200-run5: on runs 4-5; `sources` says which figure comes from which run and command; scripts/fidelity.py
--fit reproduces them).
`hotexperts calibrate` measures this machine (and with --bench fits the decode terms on its bench JSONs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from hotexperts.errors import HotExpertsError, read_json


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    label: str                      # "estimate" | "measured" | "fitted" | "calibrated" (per figure: sources)
    vram_gb: float
    gpu_hbm_gbs: float              # achieved GPU memory bandwidth
    gpu_tflops: float               # achieved bf16 matmul throughput (prompt batches)
    gpu_layer_overhead_s: float     # eager GPU/dispatch time per decoder layer (prompt batches, not graphed)
    gpu_moe_launch_s: float         # fixed time of one graphed slot kernel (hits) or host-read kernel
    h2d_gbs: float                  # pinned host -> device copy
    sync_s: float                   # per layer with CPU work, synchronous path: D2H ids/x, wait, H2D, add
    cpu_read_gbs: float             # plain streaming read of host memory
    cpu_expert_gbs: dict = field(default_factory=dict)   # format -> GB/s: marginal expert of a worker call
    cpu_call_s: float = 20e-6       # fixed cost of one CPU worker call (one per layer with CPU misses)
    cpu_tflops: float = 1.0         # CPU expert matmul throughput for prompt batches
    notes: str = ""
    # ---- graphed worker decode (docs/simulator.md "Decode") ----
    gpu_layer_s: float = 40e-6      # graphed decode time per decoder layer beyond its dense bytes / HBM
    gpu_expert_gbs: dict = field(default_factory=dict)   # slot format -> GB/s of the graphed slot kernel
    post_s: float = 10e-6           # post + collect kernels of a layer that posts (no wait)
    handoff_s: float = 10e-6        # per layer with CPU work: wait beyond the CPU's compute time
    gpu_host_read_s: float = 100e-6  # GPU-computed miss: fixed latency of reading experts over PCIe
    host_step_s: float = 0.0        # host bookkeeping per decode step of a hybrid executor (mailbox, stats)
    host_policy_s: dict = field(default_factory=dict)    # policy -> more for a managed cache ("*": others)
    host_swap_s: float = 0.0        # ... per swap issued
    sources: dict = field(default_factory=dict)          # figure -> where it comes from (run, command)

    def cpu_gbs(self, fmt: str) -> float:
        if fmt in self.cpu_expert_gbs:
            return float(self.cpu_expert_gbs[fmt])
        return float(self.cpu_read_gbs) * 0.5          # unknown format: half the plain read rate

    def gpu_expert_rate(self, fmt: str) -> float:
        """GB/s of slot weights the graphed decode kernel reads per expert (unknown format: HBM)."""
        return float(self.gpu_expert_gbs.get(fmt, self.gpu_hbm_gbs))

    def policy_seconds(self, policy: str | None) -> float:
        """Host bookkeeping per decode step of a managed cache with this policy (observe, plan)."""
        hp = self.host_policy_s
        if not isinstance(hp, dict):                   # a plain number applies to every policy
            return float(hp)
        if policy in hp:
            return float(hp[policy])
        return float(hp.get("*", max(hp.values(), default=0.0)))

    def to_dict(self) -> dict:
        return asdict(self)


_EST = "estimate (scaled from the h200 fit; not measured on such a machine)"
_CONSUMER_DECODE = dict(gpu_layer_s=110e-6, post_s=20e-6, handoff_s=0.0, gpu_host_read_s=120e-6,
                        host_step_s=0.7e-3, host_policy_s={"window-lfu": 0.7e-3, "auto": 1.9e-3},
                        host_swap_s=0.0)
BUILTIN = {
    "rtx4090-7950x": HardwareProfile(
        "rtx4090-7950x", "estimate", vram_gb=24.0, gpu_hbm_gbs=900.0, gpu_tflops=150.0,
        gpu_layer_overhead_s=15e-6, gpu_moe_launch_s=6e-6, h2d_gbs=25.0, sync_s=30e-6, cpu_read_gbs=65.0,
        cpu_expert_gbs={"bf16": 35.0, "int8": 55.0, "int4": 45.0}, cpu_call_s=100e-6, cpu_tflops=1.5,
        notes="RTX 4090 (1008 GB/s GDDR6X) + Ryzen 9 7950X, DDR5-6000 dual channel, PCIe 4.0 x16",
        gpu_expert_gbs={"bf16": 600.0, "int8": 330.0, "int4": 120.0}, **_CONSUMER_DECODE,
        sources={"*": _EST}),
    "rtx3060-ddr4": HardwareProfile(
        "rtx3060-ddr4", "estimate", vram_gb=12.0, gpu_hbm_gbs=320.0, gpu_tflops=25.0,
        gpu_layer_overhead_s=20e-6, gpu_moe_launch_s=8e-6, h2d_gbs=20.0, sync_s=35e-6, cpu_read_gbs=38.0,
        cpu_expert_gbs={"bf16": 20.0, "int8": 32.0, "int4": 28.0}, cpu_call_s=120e-6, cpu_tflops=0.6,
        notes="RTX 3060 12 GB (360 GB/s) + 8-core AVX2 desktop, DDR4-3200 dual channel, PCIe 4.0 x16",
        gpu_expert_gbs={"bf16": 210.0, "int8": 115.0, "int4": 45.0}, **_CONSUMER_DECODE,
        sources={"*": _EST}),
    "h200": HardwareProfile(
        "h200", "fitted", vram_gb=141.0, gpu_hbm_gbs=4300.0, gpu_tflops=700.0,
        gpu_layer_overhead_s=40e-6, gpu_moe_launch_s=4e-6, h2d_gbs=55.0, sync_s=77e-6, cpu_read_gbs=77.0,
        cpu_expert_gbs={"bf16": 48.0, "int8": 125.0, "int4": 157.0}, cpu_call_s=123.3e-6,
        cpu_tflops=4.0,
        notes="H200 + 16-core Xeon (AMX): decode terms refitted on run 7 (graphed worker decode, compiled "
              "dense part, 512-bit VNNI CPU kernel; int4 Qwen3-30B-A3B), see sources; prompt terms "
              "(TFLOPS, eager per-layer overhead) estimated. 'h200-run5' keeps the run-5 fit",
        gpu_expert_gbs={"bf16": 3199.0, "int8": 1587.0, "int4": 556.6},
        gpu_layer_s=71.5e-6, post_s=34.2e-6, handoff_s=0.0, gpu_host_read_s=96.4e-6,
        host_step_s=708.7e-6, host_policy_s={"window-lfu": 684.0e-6, "auto": 1867.0e-6},
        host_swap_s=0.0,
        sources={
            "gpu_hbm_gbs, h2d_gbs, sync_s, cpu_read_gbs": "measured, ../shared/MACHINE.md (2026-11-28)",
            "gpu_expert_gbs": "measured: 8 experts of one decode layer through the graphed slot kernel, "
                              "minus gpu_moe_launch_s: int4 46.4 us (run 5, `scripts/bench_gpu_moe.py "
                              "--quant-sweep`, default config), bf16 27.6 / int8 27.8 us (run 1, "
                              "`scripts/bench_gpu_moe.py`)",
            "gpu_moe_launch_s": "estimate (a graphed kernel node)",
            "gpu_host_read_s": "measured ~150 us for one int4 expert read by the GPU over PCIe (run 5, "
                               "docs/benchmarks.md), minus its bytes / h2d_gbs",
            "cpu_call_s, cpu_expert_gbs.int4": "fitted: cpu_ms_per_token of run 7 (`BENCH_ARGS=--compile "
                                               "scripts/gpu_run7.sh` at 93f9d36) cpu-moe, n-cpu-moe, cache, "
                                               "16 GiB",
            "gpu_layer_s, post_s": "fitted: decode tok/s of run 7 gpu and 24 GiB n-cpu-moe, hot",
            "host_step_s, host_policy_s": "fitted on runs 4-5 (run 7's host time was a stall, see "
                                          "docs/benchmarks.md)",
            "handoff_s, host_swap_s": "fitted at 0 (a free fit gave -7 us / no signal)",
            "command": "python scripts/fidelity.py docs/results/h200-run7/bench_qwen3-30b-a3b_synthetic.json "
                       "--profile h200-run5 --engine run7 --fit --fit-cpu run7:cpu-moe@16,run7:n-cpu-moe@16,"
                       "run7:cache@16 --fit-time run7:gpu@-,run7:n-cpu-moe@24,run7:hot@24 "
                       "--free gpu_layer_s,post_s",
            "fit": {"cpu_rows": ["run7:cpu-moe@16", "run7:n-cpu-moe@16", "run7:cache@16"],
                    "time_rows": ["run7:gpu@-", "run7:n-cpu-moe@24", "run7:hot@24"]},
            "gpu_tflops, cpu_tflops, gpu_layer_overhead_s": "estimate (prompt model, not re-fitted)",
        }),
    "h200-run5": HardwareProfile(
        "h200-run5", "fitted", vram_gb=141.0, gpu_hbm_gbs=4300.0, gpu_tflops=700.0,
        gpu_layer_overhead_s=40e-6, gpu_moe_launch_s=4e-6, h2d_gbs=55.0, sync_s=77e-6, cpu_read_gbs=77.0,
        cpu_expert_gbs={"bf16": 48.0, "int8": 125.0, "int4": 81.3}, cpu_call_s=141.5e-6,
        cpu_tflops=4.0,
        notes="H200 + 16-core Xeon (AMX): decode terms fitted on runs 4-5 (graphed worker decode, int4 "
              "Qwen3-30B-A3B), see sources; prompt terms (TFLOPS, eager per-layer overhead) estimated",
        gpu_expert_gbs={"bf16": 3199.0, "int8": 1587.0, "int4": 556.6},
        gpu_layer_s=112.9e-6, post_s=20.2e-6, handoff_s=0.0, gpu_host_read_s=96.4e-6,
        host_step_s=708.7e-6, host_policy_s={"window-lfu": 684.0e-6, "auto": 1867.0e-6},
        host_swap_s=0.0,
        sources={
            "gpu_hbm_gbs, h2d_gbs, sync_s, cpu_read_gbs": "measured, ../shared/MACHINE.md (2026-11-28)",
            "gpu_expert_gbs": "measured: 8 experts of one decode layer through the graphed slot kernel, "
                              "minus gpu_moe_launch_s: int4 46.4 us (run 5, `scripts/bench_gpu_moe.py "
                              "--quant-sweep`, default config), bf16 27.6 / int8 27.8 us (run 1, "
                              "`scripts/bench_gpu_moe.py`)",
            "gpu_moe_launch_s": "estimate (a graphed kernel node)",
            "gpu_host_read_s": "measured ~150 us for one int4 expert read by the GPU over PCIe (run 5, "
                               "docs/benchmarks.md), minus its bytes / h2d_gbs",
            "cpu_call_s, cpu_expert_gbs.int4": "fitted: cpu_ms_per_token of run 5 (`bash "
                                               "scripts/gpu_run5.sh`) cpu-moe, hot, cache+z0",
            "gpu_layer_s, post_s, host_step_s, host_policy_s": "fitted: decode tok/s of run 5 gpu, cpu-moe, "
                "hot, cache+z0 and run 4 (`scripts/gpu_run4.sh at 93f9d36`) 24 GiB n-cpu-moe, hot, cache",
            "handoff_s, host_swap_s": "fitted at 0 (a free fit gave -7 us / no signal)",
            "command": "python scripts/fidelity.py docs/results/h200-run5/bench_qwen3-30b-a3b_synthetic.json "
                       "docs/results/h200-run4/bench_qwen3-30b-a3b_synthetic.json --fit --profile h200",
            "fit": {"cpu_rows": ["run5:cpu-moe@16", "run5:hot@16", "run5:cache+z0@16"],
                    "time_rows": ["run5:gpu@-", "run5:cpu-moe@16", "run4:n-cpu-moe@24", "run4:hot@24",
                                  "run4:cache@24", "run5:hot@16", "run5:cache+z0@16"]},
            "gpu_tflops, cpu_tflops, gpu_layer_overhead_s": "estimate (prompt model, not re-fitted)",
        }),
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


# Published stock llama.cpp decode speeds the predicted table's all-GPU / layer-offload rows are checked
# against (bench/predict.py): profile name -> placement ("gpu", "n-cpu-moe") -> one figure with its source.
# rtx4090-7950x, all-GPU: JohannesGaessler's llama-bench table in ggml-org/llama.cpp PR #15631
# (https://github.com/ggml-org/llama.cpp/pull/15631): RTX 4090, qwen3moe 30B.A3B Q4_0, n_ubatch 1
# (one token per forward pass, i.e. decode speed) over pp4096: 194.24 t/s before and 205.87 t/s after
# the PR. No stock figure for layer offload (-ncmoe) on this card was found: that row is not printed.
PUBLISHED = {
    "rtx4090-7950x": {
        "gpu": {"tg_tps": 200.0, "model": "qwen3-30b-a3b", "what": "stock llama.cpp, qwen3moe 30B.A3B Q4_0, "
                "batch-1 decode over 4096 tokens: 194-206 t/s",
                "url": "https://github.com/ggml-org/llama.cpp/pull/15631"},
    },
}
CHECK_TOLERANCE = 1.5          # a prediction within [1/1.5, 1.5] x the published figure is printed


def published(profile: str, placement: str) -> dict | None:
    """The published stock llama.cpp figure for this profile and placement kind, or None."""
    return PUBLISHED.get(profile, {}).get(placement)
