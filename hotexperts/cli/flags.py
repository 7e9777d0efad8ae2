"""The one flag vocabulary of the `hotexperts` commands: every flag two commands share is defined here, once,
with the same name, meaning, value syntax and help in each (docs/cli.md lists them).

    HelpFormatter                                help for users: the description as written, every
                                                 option's default shown
    add_model_arguments(parser, required=True)   --model/-m, --dtype, --device, --max-context/-c,
                                                 --no-cuda-graph, --piecewise-graph, --compile, and the
                                                 llama.cpp habits -ngl, -fa, --no-mmap, --mlock (accepted
                                                 where they mean what they mean here, else one clear error)
    add_model_argument, add_dtype_argument, add_device_argument, add_seed_argument, add_max_tokens_argument
    add_json_argument / add_plots_argument       --json FILE (alias --stats-json), --plots DIR (alias --plot)
    add_hardware_argument                        --hardware NAME|FILE (aliases --profile, --predict)
    add_cache_budget_arguments                   --moe-cache SIZE[,SIZE] (legacy --budget: bare = slots),
                                                 --moe-max-swaps, --moe-pp-bypass (simulate, auto)
    add_chat_arguments                           trace: --chat (the template switch, as in generate),
                                                 --chat-file FILE.jsonl (legacy: --chat FILE, warned)
    add_placement_arguments(parser)              where experts live (llama.cpp meanings) and the cache knobs
    add_vram_budget_argument, add_expert_quant_argument, add_dense_quant_argument, add_policy_argument,
    add_pp_bypass_argument, add_piecewise_graph_argument
                                                 one flag each, shared by generate/serve/trace and bench
                                                 (bench: a --vram-budget list, --policy kept as an alias)
    add_kernel_arguments(parser)                 -t/--threads and the kernel backends
    placement_from_args(args) -> Placement       the flags as one request in the placement grammar
                                                 (experts/placement.py): --placement TEXT is the grammar
                                                 itself; --cpu-moe, --n-cpu-moe, --moe-hot-k, --moe-cache,
                                                 --moe-profile and --vram-budget alone are sugar for it
    vram_budgets(text, device) -> [GiB | None]   bench's --vram-budget list ('auto' on CPU: None + a note)
    kernel_options_from_args(args) -> KernelOptions
    load_engine(args) -> Engine                  the model, placement and kernels these flags name

Contradictory flags raise PlacementError (the CLI prints `error: ...`, exit 2).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import replace

from hotexperts.config import GPU_MOE_BACKENDS, STAGE_COPY_MODES, KernelOptions
from hotexperts.engine.engine import DENSE_QUANT, Engine, resolve_device
from hotexperts.engine.load import DTYPES
from hotexperts.engine.presets import PRESETS
from hotexperts.errors import PlacementError
from hotexperts.experts.budget import GiB, parse_bytes, parse_cache
from hotexperts.experts.build import auto_budget
from hotexperts.experts.placement import DECODE, Placement
from hotexperts.formats import EXPERT_QUANT_CHOICES, expert_quant_help
from hotexperts.trace.synthetic import PRESETS as SYNTHETIC_PRESETS

POLICY_CHOICES = ("lru", "window-lfu", "decay", "static", "auto")
POLICY_HELP = ("cache policy: lru (least recently used), window-lfu (most used over --moe-window tokens), "
               "decay (exponentially decayed use counts), static (the --moe-profile hot set, never changed), "
               "auto (decayed use counts mixed with recency; a swap only where the CPU time it saves repays "
               "the copy)")
SYNTHETIC_ROUTING = " | ".join(SYNTHETIC_PRESETS)       # trace --synthetic, bench --route-synthetic
DTYPE_CANONICAL = {name: str(dt).removeprefix("torch.") for name, dt in DTYPES.items()}
DTYPE_CHOICES = tuple(dict.fromkeys(DTYPE_CANONICAL.values()))   # bfloat16 float16 float32 (+ bf16 fp16 fp32)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option that has a default shows it (unless its help
    already says 'default'); switches and options without a default show nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not shows_default(action) or "default" in text.lower():
            return text
        return f"{text} (default: {action.default})" if text else f"default: {action.default}"


def shows_default(action: argparse.Action) -> bool:
    """An option with a value of its own by default (0 counts; None, a switch's False and [] do not)."""
    d = action.default
    nothing = d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list | tuple) and not d)
    return bool(action.option_strings) and not nothing


def warn(message: str) -> None:
    """One 'warning: ...' line on stderr (deprecated spellings, flags that mean nothing on this machine)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class LegacySpelling(argparse.Action):
    """An option whose old spellings still work: a spelling in `legacy` (old -> note) prints the note as a
    warning; `convert` (spelling, value) -> value rewrites what an old spelling meant into the new syntax."""

    def __init__(self, option_strings, dest, legacy: dict | None = None, convert=None, **kw):
        self.legacy, self.convert = legacy or {}, convert
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.legacy:
            warn(self.legacy[option_string])
        if self.convert is not None:
            values = self.convert(option_string, values)
        setattr(namespace, self.dest, values)


def preset_names() -> str:
    return ", ".join(PRESETS)


def presets_epilog() -> str:
    """The preset list every command that takes --model shows under its options."""
    wrapped = textwrap.fill(preset_names(), width=100, initial_indent="  ", subsequent_indent="  ",
                            break_on_hyphens=False)
    return ("presets (--model preset:NAME builds one with seeded random weights in memory, no download;\n"
            "`hotexperts make-model --help` describes each):\n" + wrapped)


def add_model_argument(p, required: bool = True, default: str | None = None, group=None) -> None:
    """-m/--model: a Hugging Face directory, a .gguf file or preset:NAME (the presets in the epilog)."""
    (group or p).add_argument("-m", "--model", required=required, default=default,
                              metavar="DIR|FILE|preset:NAME",
                              help="model: a Hugging Face directory (safetensors), a .gguf file, or "
                                   "preset:NAME (listed below)")
    if isinstance(p, argparse.ArgumentParser) and "presets (" not in (p.epilog or ""):
        p.epilog = "\n\n".join(x for x in (p.epilog, presets_epilog()) if x)


def canonical_dtype(text: str) -> str:
    """bf16/fp16/fp32 and the full names -> the full name (one set of choices in every command)."""
    key = str(text).strip().lower()
    if key not in DTYPE_CANONICAL:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}: choose {', '.join(DTYPE_CANONICAL)}")
    return DTYPE_CANONICAL[key]


def add_dtype_argument(p, default: str | None = "bfloat16", help: str | None = None) -> None:
    p.add_argument("--dtype", type=canonical_dtype, default=default, metavar="DTYPE",
                   help=help or "weights' float type: bfloat16, float16 or float32 (or bf16, fp16, fp32)")


def add_device_argument(p, help: str | None = None) -> None:
    p.add_argument("--device", default=None,
                   help=help or "cuda, cuda:1 or cpu (default: cuda when a GPU is visible, else cpu)")


def add_seed_argument(p, what: str, default: int | None = 0) -> None:
    """--seed N: `what` says what it seeds in this command."""
    p.add_argument("--seed", type=int, default=default, metavar="N", help=f"random seed of {what}")


def add_max_tokens_argument(p, default: int, what: str = "tokens to generate at most") -> None:
    p.add_argument("-n", "--max-tokens", "--n-predict", dest="max_tokens", type=int, default=default,
                   metavar="N", help=what)


def add_json_argument(p, what: str, legacy: tuple[str, ...] = ()) -> None:
    """--json FILE (every command that writes its results as JSON; `legacy`: old spellings kept)."""
    p.add_argument("--json", *legacy, dest="json", default=None, metavar="FILE", help=f"write {what} as JSON")


def add_plots_argument(p, what: str) -> None:
    """--plots DIR (alias --plot): PNG plots written into DIR."""
    p.add_argument("--plots", "--plot", dest="plots", default=None, metavar="DIR",
                   help=f"write PNG plots ({what}) into DIR (needs matplotlib)")


HARDWARE_HELP = ("hardware profile for the cost model's predicted tok/s: rtx4090-7950x, rtx3060-ddr4, h200, "
                 "or a JSON written by `hotexperts calibrate`")


def add_hardware_argument(p, dest: str, default: str | None, extra: str = "",
                          aliases: tuple[str, ...] = ("--profile",)) -> None:
    """--hardware NAME|FILE (aliases: --profile and, in bench, --predict)."""
    p.add_argument("--hardware", *aliases, dest=dest, default=default, metavar="NAME|FILE",
                   help=HARDWARE_HELP + (f"; {extra}" if extra else ""))


def _legacy_budget(option: str, value: str) -> str:
    """--budget's old syntax (a bare number = slots) in --moe-cache's (a bare number = GiB)."""
    if option != "--budget":
        return value
    return ",".join(f"{v.strip()}slots" if v.strip().isdigit() else v.strip() for v in str(value).split(","))


def add_cache_budget_arguments(p, sweep: bool, max_swaps_default: int | None = None) -> None:
    """simulate / auto: the cache's slot budget and knobs under generate's names (--moe-cache, ...)."""
    many = "[,SIZE...]" if sweep else ""
    p.add_argument("--moe-cache", "--budget", dest="moe_cache", default=None, metavar=f"SIZE{many}",
                   action=LegacySpelling, convert=_legacy_budget,
                   legacy={"--budget": "--budget is now --moe-cache (as in generate); its bare numbers "
                                       "still mean slots there, write them as '600slots'"},
                   help="one slot budget shared by all MoE layers, as generate's --moe-cache: GiB ('8GiB', "
                        "'8', needs the expert size: --model-shape or --expert-mb) or slots ('600slots')"
                        + ("; a comma list sweeps" if sweep else ""))
    p.add_argument("--moe-max-swaps", "--max-swaps", dest="max_swaps", type=int, default=max_swaps_default,
                   metavar="N", help="expert copies per decode step (default: unbounded)"
                   if max_swaps_default is None else "expert copies per decode step")
    add_pp_bypass_argument(p, dest="pp_bypass", aliases=("--pp-bypass",))


def budget_for_simulator(value: str | None) -> str | None:
    """--moe-cache's syntax -> the simulator's (trace/simulate.py, trace/auto.py: a bare number = slots,
    a size with a unit = bytes): '600slots' -> '600', '8' -> '8GiB', '8GiB' -> '8GiB'."""
    if value is None:
        return None
    out = []
    for item in str(value).split(","):
        bytes_, slots = parse_cache(item.strip())
        out.append(str(slots) if slots is not None else f"{bytes_ / 1024}KiB")
    return ",".join(out)


def add_chat_arguments(p, group) -> None:
    """trace: --chat as in generate (the chat template on, the default for --prompts) and --chat-file."""
    group.add_argument("--chat-file", dest="chat_file", default=None, metavar="FILE.jsonl",
                       help="one JSON chat transcript per line ({\"messages\": [...]} or a bare list)")
    p.add_argument("--chat", dest="chat", nargs="?", const=True, default=False, action=_ChatFlag,
                   metavar="FILE.jsonl",
                   help="wrap each --prompts line in the chat template, as generate --chat (the default "
                        "for --prompts; --raw turns it off). The old form --chat FILE.jsonl still reads "
                        "transcripts (deprecated: --chat-file)")


class _ChatFlag(argparse.Action):
    """--chat alone: the template switch; --chat FILE: the deprecated spelling of --chat-file (warned)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is True:
            namespace.chat = True
            return
        warn("--chat FILE.jsonl is now --chat-file FILE.jsonl (--chat alone means the chat template, as in "
             "generate)")
        if getattr(namespace, "chat_file", None):
            parser.error("--chat FILE and --chat-file both given: keep --chat-file")
        namespace.chat_file = values


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    add_model_argument(p, required)
    add_dtype_argument(p)
    add_device_argument(p)
    p.add_argument("-c", "--max-context", "--ctx-size", dest="max_context", type=int, default=None,
                   metavar="N", help="KV cache length in tokens (default: the model's, at most 4096)")
    add_dense_quant_argument(p)
    p.add_argument("--embedding-on-gpu", action="store_true",
                   help="keep the token embedding in VRAM (default on CUDA: in host memory, rows per step)")
    p.add_argument("--no-cuda-graph", action="store_true", help="never capture the decode step")
    add_piecewise_graph_argument(p)
    add_compile_argument(p)
    add_llama_compat_arguments(p)


def add_llama_compat_arguments(p: argparse.ArgumentParser) -> None:
    """llama.cpp flags a user types from habit, accepted where hotexperts does the same thing anyway."""
    g = p.add_argument_group("llama.cpp compatibility (accepted; see each for what it means here)")
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", default=None, metavar="N",
                   help="llama.cpp's dense layers on the GPU: here every dense layer is on the GPU whenever "
                        "one is used, so any N >= the model's layers (99, all, auto) is accepted; experts "
                        "are placed by --cpu-moe / --n-cpu-moe / --moe-cache")
    g.add_argument("-fa", "--flash-attn", dest="flash_attn", nargs="?", const="on", default=None,
                   metavar="on|off|auto",
                   help="accepted: attention always runs torch's fused scaled-dot-product kernels (flash "
                        "where the GPU has them); 'off' is refused")
    g.add_argument("--no-mmap", action="store_true",
                   help="accepted: experts are always read into (pinned) RAM, never served from a mapping")
    g.add_argument("--mlock", action="store_true", help="accepted: pinned host memory is never swapped out")


FLASH_ATTN = ("on", "off", "auto", "1", "0", "true", "false")


def check_llama_compat(args: argparse.Namespace, num_layers: int | None = None) -> None:
    """PlacementError for a llama.cpp flag whose value asks for something hotexperts does not do."""
    fa = getattr(args, "flash_attn", None)
    if fa is not None and str(fa).lower() not in FLASH_ATTN:
        raise PlacementError(f"-fa/--flash-attn: expected on, off or auto, got {fa!r}")
    if fa is not None and str(fa).lower() in ("off", "0", "false"):
        raise PlacementError("-fa off: hotexperts has no non-fused attention path; leave -fa out")
    ngl = getattr(args, "n_gpu_layers", None)
    if ngl is None or str(ngl).lower() in ("all", "auto"):
        return
    n = _int(str(ngl), "-ngl/--n-gpu-layers")
    if n < 0:
        return                                         # llama.cpp: -1 = all
    if n == 0:
        raise PlacementError("-ngl 0: for a CPU-only run use --device cpu; with a GPU every dense layer "
                             "is on it (place experts with --cpu-moe / --n-cpu-moe N)")
    if num_layers is not None and n < num_layers:
        raise PlacementError(f"-ngl {n}: hotexperts keeps all {num_layers} dense layers on the GPU "
                             f"(they are small); to keep VRAM, move experts: --n-cpu-moe or --moe-cache")


def add_dense_quant_argument(p) -> None:
    """--dense-quant auto|q8|none (generate, serve, bench): how the dense projections are kept."""
    p.add_argument("--dense-quant", choices=DENSE_QUANT, default="auto",
                   help="dense projections: auto keeps a GGUF's quantized ones (Q8_0 & co., exact) and float "
                        "ones as they are; q8 quantizes float ones to int8 per 32 (Q8_0 layout, not exact); "
                        "none dequantizes all to --dtype")


def add_piecewise_graph_argument(p) -> None:
    """--piecewise-graph (generate, serve, bench)."""
    p.add_argument("--piecewise-graph", action="store_true",
                   help="experimental: CUDA graphs around the hybrid cache's per-layer host work")


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    """--compile (generate, bench, serve): torch.compile the T=1 decode step's dense part."""
    p.add_argument("--compile", action="store_true",
                   help="torch.compile (Inductor) the decode step's norms, attention and router into fewer "
                        "kernels; compiles on the first token (seconds to minutes, cached on disk)")


def add_kernel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kernels")
    g.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="CPU threads of the expert kernel (default: physical cores, one fewer beside a GPU)")
    g.add_argument("--cpu-exact", action="store_true",
                   help="CPU experts in exact fp32 (no int8 activations on the integer path)")
    g.add_argument("--gpu-moe-backend", choices=GPU_MOE_BACKENDS, default="auto",
                   help="GPU expert kernels: Triton where it applies (auto), or force one")
    g.add_argument("--stage-copy", choices=STAGE_COPY_MODES, default="auto",
                   help="prompt staging copies: cudaMemcpyAsync per run (memcpy) or one GPU gather")


def kernel_options_from_args(args: argparse.Namespace) -> KernelOptions:
    return KernelOptions(cpu_threads=args.threads, act_quant=False if args.cpu_exact else None,
                         gpu_moe=args.gpu_moe_backend, stage_copy=args.stage_copy)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("expert placement")
    g.add_argument("--placement", default=None, metavar="TEXT",
                   help="where experts live, in the placement grammar: gpu | cpu | layers:N | hot:K | "
                        "cache:SIZE[:POLICY] | static:FILE | RANGE=WHERE,... (e.g. 0-11=cpu,12-47=gpu)")
    g.add_argument("--experts", choices=("gpu", "cpu"), default=None,
                   help="all routed experts on the GPU / the CPU")
    g.add_argument("--cpu-moe", action="store_true", help="all routed experts on the CPU")
    g.add_argument("--n-cpu-moe", "-ncmoe", default=None, metavar="N|auto",
                   help="experts of the first N MoE layers on the CPU (auto: the smallest N that fits)")
    g.add_argument("--moe-hot-k", type=int, default=None, metavar="K", help="K GPU slots per MoE layer")
    g.add_argument("--moe-window", type=int, default=None, metavar="W", help="routing counted over W tokens")
    g.add_argument("--moe-rebalance-interval", type=int, default=None, metavar="R",
                   help="rebalance every R generated tokens")
    add_pp_bypass_argument(g)
    g.add_argument("--moe-cache", default=None, metavar="BUDGET",
                   help="one slot budget for all layers' experts: GiB ('8GiB', '8'), slots ('2000slots') or "
                        "auto (what --vram-budget leaves)")
    add_policy_argument(g, "default: auto for --moe-cache, window-lfu for --moe-hot-k")
    g.add_argument("--moe-profile", default=None, metavar="FILE",
                   help="routing profile: static placement alone, warm start with --moe-hot-k/--moe-cache")
    g.add_argument("--moe-max-swaps", type=int, default=4, metavar="N", help="expert copies per decode step")
    add_vram_budget_argument(g)
    add_expert_quant_argument(g)
    g.add_argument("--moe-gpu-misses", default=None, metavar="N|auto",
                   help="decode: per layer, the GPU computes up to N missed experts itself (one per 4 "
                        "misses) by reading them from pinned RAM over PCIe, alongside the CPU (auto: 0, "
                        "measured slower than the CPU on the H200 machine)")
    g.add_argument("--moe-decode", default="auto", choices=DECODE,
                   help="decode's CPU experts: a native worker fed through pinned memory, so the step is one "
                        "CUDA graph (worker; auto = on CUDA), or a host round trip per layer (sync)")


VRAM_BUDGET_HELP = ("the process's whole GPU memory, CUDA context included (context + dense + KV + workspace "
                    "+ staging + slots): GiB ('16') or with a unit ('5015MiB'); auto: what the GPU has free")


def add_vram_budget_argument(g, sweep: bool = False) -> None:
    """--vram-budget SIZE|auto (generate, serve, trace); sweep (bench): a comma list, one run per budget."""
    if sweep:
        g.add_argument("--vram-budget", default=None, metavar="SIZE[,SIZE...]|auto",
                       help=VRAM_BUDGET_HELP + "; a comma list (16,24) compares at each; without a GPU, "
                            "auto is the --hardware profile's card (default: unlimited; on CPU the profile's "
                            "card)")
        return
    g.add_argument("--vram-budget", default=None, metavar="GiB|auto",
                   help=VRAM_BUDGET_HELP + " (without a GPU: no limit, and a note says so). Not --moe-cache, "
                        "which is the experts' share alone")


def add_expert_quant_argument(g) -> None:
    """--expert-quant NAME (generate, serve, trace, bench): the experts' format."""
    g.add_argument("--expert-quant", default="none", choices=EXPERT_QUANT_CHOICES, help=expert_quant_help())


def add_policy_argument(g, default_note: str, dest: str = "moe_policy",
                        aliases: tuple[str, ...] = ()) -> None:
    """--moe-policy NAME: the cache policy (bench: dest `policy`, alias --policy, its 'cache' placement's)."""
    g.add_argument("--moe-policy", *aliases, dest=dest, default=None, choices=POLICY_CHOICES,
                   help=f"{POLICY_HELP} ({default_note})")


def add_pp_bypass_argument(g, dest: str = "moe_pp_bypass", aliases: tuple[str, ...] = ()) -> None:
    """--moe-pp-bypass T (generate's placement flags; simulate and auto keep --pp-bypass)."""
    g.add_argument("--moe-pp-bypass", *aliases, dest=dest, type=int, default=64, metavar="T",
                   help="prompt batches over T tokens bypass the cache policy")


def placement_from_args(args: argparse.Namespace) -> Placement:
    a = args
    mode = _mode_flag(a)
    _check_knobs(a, mode)
    p = Placement.parse(a.placement if mode == "--placement" else _mode_text(a, mode))
    over = dict(pp_bypass=a.moe_pp_bypass, window=a.moe_window, rebalance_interval=a.moe_rebalance_interval,
                vram_budget=_budget_arg(a.vram_budget, getattr(a, "device", None)),
                expert_quant=a.expert_quant,
                max_swaps_per_step=a.moe_max_swaps, decode=a.moe_decode)
    for key, value in (("policy", a.moe_policy), ("profile", a.moe_profile),
                       ("gpu_misses", _gpu_misses_arg(a.moe_gpu_misses))):
        if value is not None:                       # a flag wins over the same knob in --placement's text
            over[key] = value
    return replace(p, **over)


def _mode_flag(a) -> str | None:
    flags = (("--placement", a.placement is not None), ("--experts gpu", a.experts == "gpu"),
             ("--experts cpu", a.experts == "cpu"), ("--cpu-moe", a.cpu_moe),
             ("--n-cpu-moe", a.n_cpu_moe is not None), ("--moe-hot-k", a.moe_hot_k is not None),
             ("--moe-cache", a.moe_cache is not None))
    modes = [name for name, on in flags if on]
    if modes == ["--experts cpu", "--cpu-moe"]:
        modes = ["--cpu-moe"]
    if len(modes) > 1:
        raise PlacementError(f"{' and '.join(modes)} contradict each other: choose one placement")
    return modes[0] if modes else None


def _check_knobs(a, mode: str | None) -> None:
    fixed = ("--experts gpu", "--experts cpu", "--cpu-moe", "--n-cpu-moe")
    if a.moe_profile and mode in fixed:
        raise PlacementError(f"--moe-profile needs a cache (--moe-hot-k or --moe-cache), not {mode}")
    dynamic = mode in ("--moe-hot-k", "--moe-cache", "--placement")
    for flag, val in (("--moe-window", a.moe_window), ("--moe-rebalance-interval", a.moe_rebalance_interval)):
        if val is not None and not dynamic:
            raise PlacementError(f"{flag} needs --moe-hot-k or --moe-cache")
    if a.moe_policy is not None and not (dynamic or a.moe_profile):
        raise PlacementError("--moe-policy needs --moe-cache, --moe-hot-k or --moe-profile")
    if a.moe_policy == "static" and not a.moe_profile:
        raise PlacementError("--moe-policy static needs --moe-profile FILE")


def _mode_text(a, flag: str | None) -> str:
    """The grammar text a placement flag is sugar for."""
    if flag in ("--experts cpu", "--cpu-moe"):
        return "cpu"
    if flag == "--n-cpu-moe":
        n = str(a.n_cpu_moe)
        if n != "auto":
            _int(n, "--n-cpu-moe")
        return f"layers:{n}"
    if flag == "--moe-hot-k":
        return f"hot:{a.moe_hot_k}"
    if flag == "--moe-cache":
        if a.moe_cache != "auto":
            parse_cache(a.moe_cache)                  # a clear error for an unreadable size
        return f"cache:{a.moe_cache}"
    if flag is None and a.moe_profile:
        return f"static:{a.moe_profile}"
    if flag is None and a.vram_budget is not None:
        return "layers:auto"
    return "gpu"


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PlacementError(f"{what}: expected an integer, got {text!r}") from None


def _gpu_misses_arg(v) -> int | None:
    return None if v is None or str(v) == "auto" else _int(v, "--moe-gpu-misses")


VRAM_AUTO_ON_CPU = ("--vram-budget auto on a machine without a CUDA GPU: there is no card to measure, so "
                    "no VRAM limit applies (the 'gpu' places are emulated in this CPU's RAM); give a size "
                    "such as --vram-budget 16 to emulate that card")


def _budget_arg(v, device=None) -> int | str | None:
    if v is None:
        return None
    if "," in str(v):
        raise PlacementError(f"--vram-budget {v} lists one budget per card, and this command runs on one "
                             "card: give one budget (e.g. --vram-budget 24); `hotexperts generate "
                             f"--vram-budget {v}` and `python -m hotexperts.engine.multi_gpu` run over "
                             "several cards (docs/multi-gpu.md)")
    if str(v).lower() == "auto":
        if resolve_device(device).type != "cuda":
            warn(VRAM_AUTO_ON_CPU)
            return None
        return "auto"
    return parse_bytes(v)


def vram_budgets(text: str | None, device) -> list[float | None]:
    """bench's --vram-budget: '16,24' / '5015MiB' / 'auto' -> GiB each ([None]: unlimited). 'auto' is the
    GPU's free memory on CUDA; without one it is None, which bench's predicted mode reads as the --hardware
    profile's card (a note says so)."""
    if not text:
        return [None]
    out: list[float | None] = []
    for item in str(text).split(","):
        if item.strip().lower() != "auto":
            out.append(parse_bytes(item) / GiB)
        elif resolve_device(device).type == "cuda":
            out.append(auto_budget(resolve_device(device)) / GiB)
        else:
            warn("--vram-budget auto without a CUDA GPU: the card of the --hardware profile when speeds are "
                 "predicted, else no limit")
            out.append(None)
    return out


def load_engine(args: argparse.Namespace, **kw) -> Engine:
    """Engine.load with the model, placement and kernel flags above (kw: Engine.load's other arguments)."""
    check_llama_compat(args)
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device,
                         placement=placement_from_args(args), max_context=args.max_context,
                         use_cuda_graph=not args.no_cuda_graph,
                         piecewise_graph=args.piecewise_graph, compile_decode=args.compile,
                         kernel_options=kernel_options_from_args(args), dense_quant=args.dense_quant,
                         host_embedding=False if args.embedding_on_gpu else None, **kw)
    try:
        check_llama_compat(args, engine.config.num_layers)
    except PlacementError:
        engine.close()
        raise
    return engine
