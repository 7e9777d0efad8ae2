"""Benchmark the fused CPU MoE kernel at full model scale (default: Qwen3-30B-A3B, 48 layers x 128 experts).

For each weight format (int4g32, int8, int8g32, int8g16, int8g16z = with a zero, bf16), one at a time to
bound RAM: build every layer's experts (one random layer, cloned, so the model is far larger than L3), then
time, for the integer formats once with the int8-activation integer path (act "q8") and once with the exact
fp32 path (act "fp32"):
  decode:  each token routes 8 random experts per layer (new ids every token) through all layers
           -> ms/token, tok/s (MoE part only), effective GB/s of expert weights, % of DRAM read bandwidth;
           for q8 also without software prefetch (column "no-pf tok/s");
  prompt:  chunks of T=16 and T=64 tokens through all layers -> tok/s;
  fallback: the plain torch path (cpu_moe_torch) for a couple of tokens, for comparison;
  kt-kernel (KTransformers) with the same shapes, if importable: each class in a subprocess with a timeout
  (a crash there cannot end this run), on --kt-layers layers (tok/s scaled to --layers).
Also: a DRAM read bandwidth (sum of a 4 GiB fp32 tensor), per-call overhead (tiny call: 1 token, 1 expert,
D = I = 64, also in fresh processes with OMP_WAIT_POLICY unset/ACTIVE/PASSIVE; empty call: no expert
routed), and the error against a float64 reference. Prints a table;
writes JSON to $OUT/cpu_moe.json.

    python scripts/bench_cpu_moe.py                       # the H200 machine (< 4 min)
    python scripts/bench_cpu_moe.py --layers 2 --experts 16 --tokens 4 --dram-gib 0.5 --kt-classes ''  # smoke
    python scripts/bench_cpu_moe.py --kt-path DIR         # DIR holds an unpacked kt-kernel (kt_kernel/...)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hotexperts.kernels import cpu_moe as cm  # noqa: E402
from hotexperts.quant import dequantize  # noqa: E402
from hotexperts.weights import LayerExperts, QuantizedWeight  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32, help="decode tokens timed per format")
    p.add_argument("--formats", default="int4g32,int8,bf16")
    p.add_argument("--threads", type=int, default=0, help="0 = physical cores")
    p.add_argument("--dram-gib", type=float, default=4.0)
    p.add_argument("--kt-path", default="shared/kt_kernel_site", help="dir with kt_kernel/ (optional)")
    p.add_argument("--kt-classes", default="AMXBF16_MOE", help="kt-kernel classes ('' = none)")
    p.add_argument("--kt-layers", type=int, default=8, help="layers kt-kernel is built with (RAM, time)")
    p.add_argument("--kt-timeout", type=float, default=90.0, help="seconds per kt-kernel class")
    p.add_argument("--kt-worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--overhead-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


# ---------------------------------------------------------------- weights

def random_layer(fmt: str, E: int, D: int, I: int, gen: torch.Generator) -> LayerExperts:
    def mat(N: int, K: int):
        if fmt == "int4g32":
            q = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, generator=gen)
            s = (torch.rand(E, N, K // 32, generator=gen) * 0.02 + 0.005).half()
            return QuantizedWeight(fmt, q, s, (torch.randn(E, N, K // 32, generator=gen) * 0.01).half())
        if fmt == "int8":
            q = torch.randint(-127, 128, (E, N, K), dtype=torch.int8, generator=gen)
            return QuantizedWeight(fmt, q, torch.rand(E, N, generator=gen) * 4e-4 + 1e-4)
        if fmt in ("int8g32", "int8g16", "int8g16z"):           # z: with a zero (a Q4_K_M down matrix)
            g = int(fmt[5:7])
            q = torch.randint(-127, 128, (E, N, K), dtype=torch.int8, generator=gen)
            s = (torch.rand(E, N, K // g, generator=gen) * 4e-4 + 1e-4).half()
            z = (torch.randn(E, N, K // g, generator=gen) * 0.01).half() if fmt.endswith("z") else None
            return QuantizedWeight(fmt[:7], q, s, z)
        return (torch.randn(E, N, K, generator=gen) * 0.03).to(torch.bfloat16)

    return LayerExperts(mat(2 * I, D), mat(D, I))


def clone_layer(layer: LayerExperts) -> LayerExperts:
    def c(w):
        if isinstance(w, QuantizedWeight):
            zero = None if w.zero is None else w.zero.clone()
            return QuantizedWeight(w.fmt, w.q.clone(), w.scale.clone(), zero)
        return w.clone()

    return LayerExperts(c(layer.w13), c(layer.w2))


def build_model(fmt: str, a: argparse.Namespace) -> list[LayerExperts]:
    base = random_layer(fmt, a.experts, a.dim, a.inter, torch.Generator().manual_seed(0))
    return [base] + [clone_layer(base) for _ in range(a.layers - 1)]


# ---------------------------------------------------------------- measurements

def dram_read_gbs(gib: float) -> float:
    buf = torch.ones(int(gib * 2**30) // 4)
    best = 0.0
    for _ in range(4):
        t = time.perf_counter()
        buf.sum()
        best = max(best, buf.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def routing(n: int, layers: int, E: int, K: int, T: int = 1):
    """ids [n, layers, T, K] distinct per token, weights [n, layers, T, K]."""
    ids = torch.rand(n, layers, T, E).argsort(dim=-1)[..., :K].contiguous()
    w = torch.rand(n, layers, T, K)
    return ids, w / w.sum(-1, keepdim=True)


def time_pass(fn, layers: list, x, ids, w, out) -> float:
    """Seconds for all tokens through all layers, fn(x, ids, w, layer, out)."""
    t = time.perf_counter()
    for i in range(ids.shape[0]):
        for li, layer in enumerate(layers):
            fn(x, ids[i, li], w[i, li], layer, out)
    return time.perf_counter() - t


def with_act(act_quant: bool, prefetch: int = 2):
    """cpu_moe with a fixed activation path and prefetch distance."""
    def fn(x, ids, w, layer, out):
        cm.set_prefetch_rows(prefetch)
        return cm.cpu_moe(x, ids, w, layer, out, act_quant=act_quant)

    return fn


def decode(fn, layers, a, n: int, expert_nbytes: int | None = None) -> dict:
    x, out = torch.randn(1, a.dim).bfloat16(), torch.empty(1, a.dim, dtype=torch.bfloat16)
    ids, w = routing(n + 1, len(layers), a.experts, a.top_k)
    time_pass(fn, layers, x, ids[:1], w[:1], out)                      # warm-up
    dt = time_pass(fn, layers, x, ids[1:], w[1:], out) / n
    nb = layers[0].expert_nbytes if expert_nbytes is None else expert_nbytes
    gb = len(layers) * a.top_k * nb / 1e9
    return {"ms_per_token": dt * 1e3, "tok_s": 1 / dt, "gb_s": gb / dt, "gb_per_token": gb}



def prompt(fn, layers, a, T: int) -> dict:
    x, out = torch.randn(T, a.dim).bfloat16(), torch.empty(T, a.dim, dtype=torch.bfloat16)
    ids, w = routing(2, len(layers), a.experts, a.top_k, T)
    time_pass(fn, layers, x, ids[:1], w[:1], out)
    dt = time_pass(fn, layers, x, ids[1:], w[1:], out)
    return {"T": T, "ms_per_chunk": dt * 1e3, "tok_s": T / dt}


def call_overhead_us(layer: LayerExperts | None, n: int = 2000) -> float:
    """Median µs of a tiny call (E=8, D=I=64, 1 token, 1 expert) or of an empty call on `layer`."""
    if layer is None:
        layer = LayerExperts(torch.randn(8, 128, 64), torch.randn(8, 64, 64))
        ids = torch.tensor([[3]])
    else:
        ids = torch.full((1, 8), -1)
    D = layer.w2.shape[1]
    x, w, out = torch.randn(1, D), torch.rand(1, ids.shape[1]), torch.empty(1, D)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        cm.cpu_moe(x, ids, w, layer, out)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e6


def overhead_probe(threads: int) -> dict:
    """Tiny-call µs in fresh processes under OpenMP wait policies (they only take effect at start-up)."""
    res = {}
    for policy in ("default", "ACTIVE", "PASSIVE"):
        env = dict(os.environ)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        cmd = [sys.executable, __file__, "--overhead-worker", "--threads", str(threads)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
            res[policy] = float((r.stdout.strip().splitlines() or ["nan"])[-1])
        except (subprocess.TimeoutExpired, ValueError):
            res[policy] = float("nan")
    return res


def max_rel_error(fmt: str, act_quant: bool) -> float:
    """Kernel vs float64 reference on a small layer, T=7, some -1 holes."""
    layer = random_layer(fmt, 8, 256, 128, torch.Generator().manual_seed(1))
    x = torch.randn(7, 256)
    ids, w = routing(1, 1, 8, 4, 7)
    ids, w = ids[0, 0], w[0, 0]
    ids[0, 1] = ids[3, 0] = -1
    ref = cm.cpu_moe_torch(x.double(), ids, w.double(), LayerExperts(dequantize(layer.w13, torch.float64),
                                                                    dequantize(layer.w2, torch.float64)))
    got = cm.cpu_moe(x, ids, w, layer, act_quant=act_quant).double()
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------- kt-kernel (optional)

def kt_import(path: str):
    if Path(path).is_dir():
        sys.path.insert(0, str(Path(path).resolve()))
    try:
        import kt_kernel  # noqa: F401
        from kt_kernel import kt_kernel_ext as k
        return k
    except Exception as e:  # not installed, wrong Python ABI, missing CPU features
        print(f"kt-kernel: not importable ({type(e).__name__}: {e})")
        return None


class KtLayers:
    """kt-kernel MoE objects for the same shapes; keeps its source weights alive."""

    def __init__(self, k, cls_name: str, a: argparse.Namespace, threads: int):
        self.k, self.a = k, a
        wc = k.WorkerPoolConfig()
        wc.subpool_count, wc.subpool_numa_map, wc.subpool_thread_count = 1, [0], [threads]
        self.ci = k.CPUInfer(wc)
        self.mask = torch.zeros(a.experts, dtype=torch.bool)
        self.p2l = torch.arange(a.experts, dtype=torch.int64)
        gen = torch.Generator().manual_seed(0)
        E, D, I = a.experts, a.dim, a.inter
        base = [(torch.randn(E, n, m, generator=gen) * 0.03).bfloat16() for n, m in ((I, D), (I, D), (D, I))]
        self.src = [base] + [[t.clone() for t in base] for _ in range(a.layers - 1)]
        self.moes = [self._make(getattr(k.moe, cls_name), li) for li in range(a.layers)]

    def _make(self, cls, li: int):
        a = self.a
        cfg = self.k.moe.MOEConfig(a.experts, a.top_k, a.dim, a.inter, self.mask.data_ptr())
        cfg.layer_idx, cfg.pool, cfg.max_len = li, self.ci.backend_, 64
        if getattr(cfg, "group_min_len", 0) > 1:
            cfg.group_min_len = 1                    # known trap: >1 gave wrong results for small batches
        g, u, d = self.src[li]
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = g.data_ptr(), u.data_ptr(), d.data_ptr()
        moe = cls(cfg)
        self.ci.submit(moe.load_weights_task(self.p2l.data_ptr()))
        self.ci.sync()
        return moe

    def call(self, li: int, x, ids, w, out):
        bsz = torch.tensor([x.shape[0]], dtype=torch.int32)
        self.ci.submit(self.moes[li].forward_task(bsz.data_ptr(), ids.shape[1], ids.data_ptr(), w.data_ptr(),
                                                  x.data_ptr(), out.data_ptr(), False))
        self.ci.sync()

    def layer_experts(self, li: int) -> LayerExperts:
        g, u, d = self.src[li]
        return LayerExperts(torch.cat([g, u], dim=1), d)


def kt_bench(a, threads: int, deadline: float) -> list[dict]:
    """Each class in its own process (kt-kernel has crashed with SIGFPE), killed after --kt-timeout."""
    rows = []
    for cls in [c for c in a.kt_classes.split(",") if c]:
        left = min(a.kt_timeout, deadline - time.perf_counter())
        if left < 10:
            rows.append({"kt_class": cls, "error": "skipped: time budget spent"})
            continue
        cmd = [sys.executable, __file__, "--kt-worker", cls, "--threads", str(threads),
               "--kt-path", a.kt_path, "--layers", str(a.kt_layers), "--experts", str(a.experts),
               "--dim", str(a.dim), "--inter", str(a.inter), "--top-k", str(a.top_k),
               "--tokens", str(a.tokens)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            last = (r.stdout.strip().splitlines() or [""])[-1]
            why = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
            row = json.loads(last) if last.startswith("{") else {
                "error": f"{why}: {(r.stderr or r.stdout).strip()[-300:]}"}
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {left:.0f}s"}
        row = {"kt_class": cls, **row}
        if "ms_per_token" in row:                                   # scale to the full model's layers
            row["ms_per_token_all_layers"] = row["ms_per_token"] * a.layers / a.kt_layers
            row["tok_s_all_layers"] = 1e3 / row["ms_per_token_all_layers"]
        rows.append(row)
        print("kt-kernel", row)
    return rows


def kt_worker(a) -> None:
    """Child process: one kt-kernel class; prints one JSON line."""
    k = kt_import(a.kt_path)
    if k is None:
        print(json.dumps({"error": "kt-kernel not importable"}))
        return
    names = [n for n in dir(k.moe) if n.endswith("_MOE")]
    if a.kt_worker not in names:
        print(json.dumps({"error": f"no class {a.kt_worker}; available: {names}"}))
        return
    kt = KtLayers(k, a.kt_worker, a, a.threads)
    print(json.dumps({"layers": a.layers, **kt_measure(kt, a)}))


def kt_measure(kt: KtLayers, a) -> dict:
    """Correctness on 3 tokens against a float64 reference of its bf16 source, then decode like ours."""
    x, out = torch.randn(3, a.dim).bfloat16(), torch.zeros(3, a.dim, dtype=torch.bfloat16)
    ids, w = routing(1, 1, a.experts, a.top_k, 3)
    ids, w = ids[0, 0], w[0, 0]
    kt.call(0, x, ids, w, out)
    ref = cm.cpu_moe_torch(x.double(), ids, w.double(), kt.layer_experts(0))
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    res = decode(lambda x, ids, w, li, out: kt.call(li, x, ids, w, out), list(range(a.layers)), a, a.tokens,
                 expert_nbytes=0)
    return {"max_rel_err_vs_bf16_source": err, "ms_per_token": res["ms_per_token"], "tok_s": res["tok_s"]}


# ---------------------------------------------------------------- main

def bench_format(fmt: str, a, dram: float) -> list[dict]:
    """One row per activation path: q8 (integer path; int formats with an integer dot only), fp32."""
    t = time.perf_counter()
    layers = build_model(fmt, a)
    built = time.perf_counter() - t
    acts = [True, False] if fmt.startswith("int") and cm.cpu_moe_int_dot() != "none" else [False]
    rows = []
    for aq in acts:
        fn = with_act(aq)
        r = {"format": fmt, "act": "q8" if aq else "fp32", "build_s": built,
             "max_rel_err": max_rel_error(fmt, aq)}
        r["decode"] = decode(fn, layers, a, a.tokens)
        r["decode"]["pct_dram"] = 100 * r["decode"]["gb_s"] / dram
        if aq:
            r["decode_no_prefetch"] = decode(with_act(aq, prefetch=0), layers, a, max(4, a.tokens // 2))
        cm.set_prefetch_rows(2)
        cm.set_activation_quant(aq)
        r["empty_call_us"] = call_overhead_us(layers[0], 500)
        cm.set_activation_quant(None)
        r["prompt"] = [prompt(fn, layers, a, T) for T in (16, 64)]
        rows.append(r)
        print(json.dumps(r))
    rows[-1]["torch_fallback_decode"] = decode(cm.cpu_moe_torch, layers, a, 2)
    del layers
    gc.collect()
    return rows


def table(results: list[dict], dram: float) -> str:
    lines = [f"DRAM read {dram:.1f} GB/s",
             "format   | act  | ms/tok | tok/s | GB/s  | %DRAM | no-pf tok/s | empty us | fallback tok/s "
             "| T=16 tok/s | T=64 tok/s | rel.err"]
    for r in results:
        d = r["decode"]
        nopf = f"{r['decode_no_prefetch']['tok_s']:11.1f}" if "decode_no_prefetch" in r else f"{'-':>11s}"
        fb = f"{r['torch_fallback_decode']['tok_s']:14.2f}" if "torch_fallback_decode" in r else f"{'-':>14s}"
        lines.append(f"{r['format']:8s} | {r['act']:4s} | {d['ms_per_token']:6.2f} | {d['tok_s']:5.1f} | "
                     f"{d['gb_s']:5.1f} | {d['pct_dram']:5.1f} | {nopf} | {r['empty_call_us']:8.1f} | {fb} | "
                     f"{r['prompt'][0]['tok_s']:10.1f} | {r['prompt'][1]['tok_s']:10.1f} | "
                     f"{r['max_rel_err']:.1e}")
    return "\n".join(lines)


def main() -> None:
    a = parse()
    if a.kt_worker:
        kt_worker(a)
        return
    if a.overhead_worker:
        cm.set_num_threads(a.threads or cm.get_num_threads())
        call_overhead_us(None)
        print(call_overhead_us(None))
        return
    start = time.perf_counter()
    threads = a.threads or cm.get_num_threads()
    cm.set_num_threads(threads)
    torch.set_num_threads(threads)
    backend = cm.cpu_moe_backend()
    meta = {"backend": backend, "int_dot": cm.cpu_moe_int_dot(), "ext_load_s": time.perf_counter() - start,
            "threads": threads, "torch": torch.__version__, "shape": vars(a)}
    print(f"backend {backend}, integer dot {meta['int_dot']} (load {meta['ext_load_s']:.1f}s), "
          f"threads {threads}")
    dram = dram_read_gbs(a.dram_gib)
    meta.update(dram_read_gbs=dram, tiny_call_us=call_overhead_us(None))
    meta["tiny_call_us_by_omp_wait_policy"] = overhead_probe(threads)
    print(f"DRAM read {dram:.1f} GB/s; tiny call {meta['tiny_call_us']:.1f} µs; by OMP_WAIT_POLICY "
          f"{meta['tiny_call_us_by_omp_wait_policy']}")
    results = []
    for fmt in a.formats.split(","):
        results += bench_format(fmt, a, dram)
    save({"meta": meta, "results": results})
    print(table(results, dram))
    kt = kt_bench(a, threads, start + 230) if a.kt_classes else []
    meta["total_s"] = time.perf_counter() - start
    save({"meta": meta, "results": results, "kt_kernel": kt})
    print(f"total {meta['total_s']:.0f}s")


def save(out: dict) -> None:
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cpu_moe.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
