"""`hotexperts bench`: placements side by side at one or more VRAM budgets, llama-bench style
(bench/harness.py runs them; bench/report.py prints the table; bench/predict.py labels predictions).

    hotexperts bench [--model preset:NAME|DIR|FILE.gguf] [--placements gpu,cpu-moe,n-cpu-moe,hot,cache]
        [--vram-budget 16,24] [--tests pp512,tg128] [--repeats 3] [--route-trace FILE | --route-synthetic P]
        [--expert-quant int4] [--moe-policy P] [--json FILE] [--plots DIR] [-t N] [--compile] [--hardware HW]
        [--verify-t 1,2,4,8]   (speculative decoding's verify step: bench/verify.py)
        [--parallel 1,2,4,8]   (N requests batched into one decode step: bench/concurrency.py)
On a machine without CUDA it says so first (CPU_NOTE: what is emulated, what is measured, what to read),
runs the real cache on the mini model with the slot counts the real shape gets at each budget and prints
the cost model's PREDICTED speeds for a hardware profile, labelled as such (its all-GPU / layer-offload
rows only where a published stock llama.cpp figure confirms them: bench/predict.py). `--hardware none`, or
a model with no known real shape, runs measured-only. Progress lines on CPU say "this CPU".
"""

from __future__ import annotations

from hotexperts.bench import predict as pr
from hotexperts.bench import report as rep
from hotexperts.bench.concurrency import parse_parallel
from hotexperts.bench.concurrency import table as concurrency_table
from hotexperts.bench.harness import NAMED, run_bench, tokens_needed
from hotexperts.bench.verify import parse_verify_ts
from hotexperts.bench.verify import table as verify_table
from hotexperts.bench.workload import parse_tests, routing_source
from hotexperts.cli.flags import (
    SYNTHETIC_ROUTING,
    HelpFormatter,
    add_compile_argument,
    add_dense_quant_argument,
    add_device_argument,
    add_dtype_argument,
    add_expert_quant_argument,
    add_hardware_argument,
    add_json_argument,
    add_kernel_arguments,
    add_model_argument,
    add_piecewise_graph_argument,
    add_plots_argument,
    add_policy_argument,
    add_seed_argument,
    add_vram_budget_argument,
    kernel_options_from_args,
    vram_budgets,
)
from hotexperts.engine.engine import PRESET_PREFIX, load_source, resolve_device, resolve_dtype
from hotexperts.engine.memcheck import check_before_load
from hotexperts.engine.presets import build_in_memory
from hotexperts.errors import HotExpertsError
from hotexperts.experts.build import quantized_store
from hotexperts.experts.placement import Placement
from hotexperts.formats import EXPERT_QUANT
from hotexperts.models.qlinear import quantize_dense_weights
from hotexperts.trace.profiles import get_profile

BENCH_DESCRIPTION = """\
Run expert placements side by side on one model, llama-bench style: every placement (all experts on the CPU,
llama.cpp's layer offload, the per-layer hot cache, the shared adaptive cache, all on the GPU) runs the same
tests (ppN = a prompt of N tokens, tgN = N generated tokens) at each --vram-budget; one table compares them.

On a machine without a CUDA GPU it says so first: every placement runs on this CPU (the 'GPU' slots are
emulated, so tok/s are this CPU's), the cache's hits, misses and swaps are real, and for models whose real
shape is known (the *-mini presets) the cost model prints PREDICTED speeds for --hardware; read that table.

examples:
  hotexperts bench --route-synthetic qwen3-30b-a3b --vram-budget 16 --expert-quant int4 --tests pp128,tg64
  hotexperts bench --model q30.gguf --route-synthetic qwen3-30b-a3b --vram-budget 5015MiB --placements cache
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="placements side by side at one VRAM budget (llama-bench style)",
                              description=BENCH_DESCRIPTION, formatter_class=HelpFormatter)
    add_model_argument(p, required=False, default="preset:qwen3-30b-a3b-mini")
    add_dtype_argument(p, default=None, help="weights' float type (default: bfloat16 on CUDA, float32 "
                                             "on CPU)")
    add_device_argument(p)
    p.add_argument("--placements", default=",".join(NAMED), metavar="NAME[,NAME...]",
                   help=f"placements to compare, from {', '.join(NAMED)}")
    add_vram_budget_argument(p, sweep=True)
    p.add_argument("--tests", default="pp512,tg128", metavar="TEST[,TEST...]",
                   help="ppN (prompt of N tokens), tgN (N generated), tgN@dD (after a D-token context)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="runs of each test")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--route-trace", metavar="FILE",
                     help="replay routing from a trace (.npz, .route.csv, *_routing.jsonl or a folder)")
    src.add_argument("--route-synthetic", metavar="PRESET",
                     help=f"replay calibrated synthetic routing: {SYNTHETIC_ROUTING}")
    p.add_argument("--route-tokens", type=int, default=None, metavar="N",
                   help="synthetic routing length (default: what one placement consumes: it never wraps)")
    add_expert_quant_argument(p)
    add_dense_quant_argument(p)
    add_policy_argument(p, "of the 'cache' placement; default: auto", dest="policy", aliases=("--policy",))
    add_json_argument(p, "the report")
    add_plots_argument(p, "speed per placement and budget")
    add_seed_argument(p, "the random weights and the synthetic routing")
    add_piecewise_graph_argument(p)
    p.add_argument("--verify-t", default=None, metavar="T[,T...]",
                   help="also time a T-token speculative verify step against 1-token steps per placement "
                        "(e.g. 1,2,4,8; T <= 16): cost ratios and speed per accepted tokens per step")
    p.add_argument("--parallel", "-np", dest="parallel", default=None, metavar="N[,N...]",
                   help="also run the concurrency test per placement: N requests batched into one decode "
                        "step (e.g. 1,2,4,8; N <= 16): aggregate and per-request tok/s (the engine then "
                        "holds max N sequence slots)")
    add_compile_argument(p)
    add_kernel_arguments(p)
    add_hardware_argument(p, "predict", None, aliases=("--predict", "--profile"),
                          extra="CPU-only machines run the cache with the slot counts the real shape gets at "
                                "each budget on this card and print PREDICTED speeds; none = measured only "
                                "(default without CUDA: rtx4090-7950x when the model's real shape is known)")


def run(args) -> int:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tests = parse_tests(args.tests)
    verify_ts = parse_verify_ts(args.verify_t)
    parallel_ns = parse_parallel(args.parallel)
    budgets = vram_budgets(args.vram_budget, device)
    lm = load_quantized(args.model, dtype, device, args.seed, args.expert_quant, args.dense_quant)
    kind, arg = ("trace", args.route_trace) if args.route_trace else (
        ("synthetic", args.route_synthetic) if args.route_synthetic else ("router", None))
    needed = tokens_needed(tests, args.repeats)
    source = routing_source(kind, arg, lm.cfg, num_tokens=args.route_tokens or needed, seed=args.seed)
    if kind == "router":
        print("note: routing comes from the model's own router; random weights make it unrealistic "
              "(use --route-trace or --route-synthetic for speed claims)")
    names = [s.strip() for s in args.placements.split(",") if s.strip()]
    where = "" if device.type == "cuda" else "this CPU, "
    progress = lambda msg: print(f"  {where}{msg}", flush=True)  # noqa: E731
    options = kernel_options_from_args(args)
    profile = predict_profile(args.predict, args.model, args.expert_quant, device)
    if device.type != "cuda":
        print(cpu_note(profile, args.model), flush=True)
    if profile is not None:
        return _run_predicted(args, lm, names, budgets, tests, source, device, profile, progress, options,
                              verify_ts, parallel_ns)
    report = run_bench(lm, names, budgets, tests, args.repeats, source, device, quant=args.expert_quant,
                       policy=args.policy, progress=progress, piecewise=args.piecewise_graph,
                       compile_decode=args.compile, options=options, verify_ts=verify_ts,
                       parallel_ns=parallel_ns,
                       checkpoint=(lambda r: rep.save_json(r, args.json)) if args.json else None)
    print()
    print(rep.table(report))
    _verify_table(report)
    if args.json:
        print(f"JSON: {rep.save_json(report, args.json)}")
    _plots(report, args.plots)
    return 0


def _verify_table(report: dict) -> None:
    if any(r.get("verify") for r in report["results"]):
        print()
        print(verify_table(report["results"]))
    if any(r.get("concurrency") for r in report["results"]):
        print()
        print(concurrency_table(report["results"]))


def _plots(report: dict, out_dir: str | None) -> None:
    if not out_dir:
        return
    try:
        paths = rep.plots(report, out_dir)
    except ImportError as e:
        print(f"plots: not written ({e.name or 'matplotlib'} is not installed: pip install matplotlib)")
        return
    for path in paths:
        print(f"plot: {path}")


DEFAULT_PROFILE = "rtx4090-7950x"


def predict_profile(asked: str | None, model: str, quant: str, device) -> str | None:
    """The hardware profile to predict for, or None (measured only): --hardware none, a CUDA machine
    without --hardware, or a model with no known real shape (then the CPU note says so)."""
    if asked is not None and asked.lower() == "none":
        return None
    if asked is None and (device.type == "cuda" or pr.shape_for(model, quant) is None):
        return None
    if pr.shape_for(model, quant) is None:
        raise HotExpertsError(f"--hardware {asked}: {model!r} has no known real shape to predict for (the "
                              f"qwen3-30b-a3b-mini and similar presets have one); use --hardware none")
    return asked or DEFAULT_PROFILE


def cpu_note(profile: str | None, model: str) -> str:
    """What a CPU-only run emulates, measures and predicts, printed before anything runs."""
    lines = ["note: no CUDA GPU here. What this run does:",
             "  - measured: every placement runs for real on this CPU, 'gpu' slots included (they are "
             "emulated: an expert 'in VRAM' is computed by torch on the CPU), so the tok/s it prints are "
             "this CPU's, not a GPU's; the cache's hits, misses and swaps are real",
             f"  - model: {model} (tiny widths for the *-mini presets: speeds are not the real model's)"]
    if profile is None:
        lines.append("  - predicted: nothing (--hardware none, or no known real shape for this model): read "
                     "the hit rates and swaps, not the tok/s ratios between placements")
    else:
        lines.append(f"  - predicted: the cost model turns the measured hit and swap rates into tok/s for "
                     f"the real shape on '{profile}'; read the PREDICTED table (its ratios), not the "
                     f"measured one")
    return "\n".join(lines)


def load_quantized(source: str, dtype, device, seed: int, quant: str, dense_quant: str = "auto"):
    """The model with its experts in the bench's format, quantized once (a preset is built that way
    directly: no bf16 copy of a 30B model's experts in RAM), not once per placement. The token embedding
    lives in host memory on CUDA; dense_quant as Engine.load's."""
    host = device.type == "cuda"
    direct = bool(EXPERT_QUANT.get(quant)) and source.startswith(PRESET_PREFIX)
    check_before_load(source, dtype, device, Placement(mode="cpu"),       # RAM / VRAM before any allocation
                      expert_format=EXPERT_QUANT[quant] if direct else None)
    if direct:
        lm = build_in_memory(source[len(PRESET_PREFIX):], dtype=dtype, device=device, seed=seed,
                             expert_dtype=EXPERT_QUANT[quant], host_embedding=host)
        if dense_quant == "q8":
            quantize_dense_weights(lm.model)
        return lm
    lm = load_source(source, dtype, device, seed, host, dense_quant)
    lm.store = quantized_store(lm.store, quant)
    return lm


def _run_predicted(args, lm, names, budgets, tests, source, device, profile: str, progress, options,
                   verify_ts=(), parallel_ns=()) -> int:
    """CPU-only: real cache behaviour on the mini model, predicted speeds for the real shape (labelled)."""
    shape = pr.shape_for(args.model, args.expert_quant)
    hw = get_profile(profile)
    pp = next((t.n for t in tests if t.kind == "pp"), 512)
    budgets = [b if b is not None else hw.vram_gb for b in budgets]
    out = {"predicted": [], "measured_on_this_machine": []}
    for b in budgets:
        plan = pr.real_plan(shape, b)
        report = run_bench(lm, pr.placements_for(plan, names), [None], tests, args.repeats, source, device,
                           quant=args.expert_quant, policy=args.policy, progress=progress, labels=names,
                           compile_decode=args.compile, options=options, verify_ts=verify_ts,
                           parallel_ns=parallel_ns)
        rows, notes = pr.checked(pr.predictions(report, shape, hw, plan, prompt_tokens=pp), hw)
        print()
        print(pr.table(rows, shape, hw, plan, tests, notes))
        print(f"\n(MEASURED on this machine, {report['device']}, tiny widths, 'gpu' slots emulated on the "
              f"CPU: the cache's hit rates are real; tok/s are this CPU's, not the real model's on a GPU)\n")
        print(rep.table(report))
        _verify_table(report)
        out["predicted"].append({"plan": plan, "rows": rows, "notes": notes})
        out["measured_on_this_machine"].append(report)
    _plots({**out["measured_on_this_machine"][0],
            "results": [r | {"budget_gib": b} for b, m in zip(budgets, out["measured_on_this_machine"],
                                                               strict=True) for r in m["results"]]},
           args.plots)
    if args.json:
        print(f"JSON: {rep.save_json(out | {'profile': hw.to_dict(), 'shape': shape.name}, args.json)}")
    return 0
