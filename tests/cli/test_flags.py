"""cli/flags.py: one flag vocabulary across the commands (issue 19, must-have 4): the same names, choices and
value syntax everywhere, old spellings kept as aliases (warned where their meaning moved)."""

import argparse

import pytest

from hotexperts.cli import build_parser
from hotexperts.cli.flags import DTYPE_CHOICES, budget_for_simulator, placement_from_args, vram_budgets
from hotexperts.experts.budget import GiB
from hotexperts.trace.simulate import parse_bytes as simulator_bytes

COMMANDS = ("generate", "make-model", "trace", "simulate", "calibrate", "auto", "bench", "serve")
REQUIRED = {"generate": ["-m", "preset:tiny-qwen3-moe", "-p", "x"], "serve": ["-m", "preset:tiny-qwen3-moe"],
            "trace": ["--synthetic", "qwen3-30b-a3b"], "make-model": ["--preset", "tiny-olmoe", "--out", "o"],
            "simulate": ["t.npz"], "auto": ["t.npz"], "bench": [], "calibrate": []}
# every group of spellings that must be one option (one dest) wherever a command has any of them
ONE_OPTION = [("--json", "--stats-json"), ("--plots", "--plot"), ("--hardware", "--profile", "--predict"),
              ("--moe-cache", "--budget"), ("--moe-max-swaps", "--max-swaps"), ("--moe-policy", "--policy"),
              ("-n", "--max-tokens", "--n-predict"), ("-m", "--model")]


def parse(command: str, *argv: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *REQUIRED[command], *argv])


def options(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {s: a for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("command", COMMANDS)
def test_spellings_of_one_flag_are_one_option_in_every_command(command):
    opts = options(command)
    for group in ONE_OPTION:
        present = [opts[s] for s in group if s in opts]
        assert len({id(a) for a in present}) <= 1, (command, group)


@pytest.mark.parametrize("command", [c for c in COMMANDS if "--dtype" in options(c)])
def test_dtype_has_the_same_choices_everywhere(command):
    for spelling, full in (("bf16", "bfloat16"), ("fp16", "float16"), ("float32", "float32")):
        assert parse(command, "--dtype", spelling).dtype == full
    assert set(DTYPE_CHOICES) == {"bfloat16", "float16", "float32"}


def test_make_model_accepts_bf16_and_every_command_rejects_a_bad_dtype(capsys):
    assert parse("make-model", "--dtype", "bf16").dtype == "bfloat16"
    with pytest.raises(SystemExit) as e:
        parse("make-model", "--dtype", "int3")
    assert e.value.code == 2 and "unknown dtype 'int3'" in capsys.readouterr().err


def test_trace_chat_means_generate_chat_and_the_file_is_chat_file(capsys):
    assert parse("generate", "--chat").chat is True
    args = parse("trace", "--chat")
    assert args.chat is True and args.chat_file is None
    assert parse("trace", "--chat-file", "t.jsonl").chat_file == "t.jsonl"
    assert capsys.readouterr().err == ""
    old = parse("trace", "--chat", "t.jsonl")                     # the old spelling still works, warned
    assert old.chat_file == "t.jsonl" and "--chat FILE.jsonl is now --chat-file" in capsys.readouterr().err


def test_old_spellings_land_on_the_new_option():
    assert parse("generate", "--stats-json", "s.json").json == "s.json"
    assert parse("simulate", "--plot", "d").plots == parse("simulate", "--plots", "d").plots == "d"
    assert parse("bench", "--predict", "h200").predict == parse("bench", "--hardware", "h200").predict
    assert parse("simulate", "--profile", "h200").profile == parse("simulate", "--hardware", "h200").profile
    assert parse("bench", "--policy", "lru").policy == "lru"
    assert parse("simulate", "--max-swaps", "3").max_swaps == 3
    assert parse("auto", "--moe-max-swaps", "3").max_swaps == 3


def test_moe_cache_reads_as_in_generate_and_old_budget_keeps_its_meaning(capsys):
    assert parse("simulate", "--moe-cache", "600slots,8").moe_cache == "600slots,8"
    assert capsys.readouterr().err == ""
    old = parse("simulate", "--budget", "600,8GiB")
    assert old.moe_cache == "600slots,8GiB" and "--budget is now --moe-cache" in capsys.readouterr().err
    assert parse("auto", "--budget", "100").moe_cache == "100slots"
    assert budget_for_simulator("600slots") == "600"
    for text, expect in (("8", 8 * GiB), ("8GiB", 8 * GiB), ("512MiB", 512 * 2**20)):
        assert simulator_bytes(budget_for_simulator(text)) == expect
    assert budget_for_simulator(None) is None


def test_vram_budget_auto_on_cpu_is_accepted_and_says_what_it_means(capsys):
    args = parse("generate", "--vram-budget", "auto", "--device", "cpu")
    assert placement_from_args(args).vram_budget is None
    assert "--vram-budget auto on a machine without a CUDA GPU" in capsys.readouterr().err
    assert vram_budgets("auto,16", "cpu") == [None, 16.0]
    assert "the card of the --hardware profile" in capsys.readouterr().err
    assert vram_budgets(None, "cpu") == [None] and vram_budgets("5015MiB", "cpu") == [5015 / 1024]


def test_llama_cpp_short_flags_are_shared_by_generate_trace_and_serve():
    for command in ("generate", "serve"):
        assert {"-m", "-c", "-t", "-ngl", "-fa", "--no-mmap", "-ncmoe"} <= set(options(command))
    assert {"-m", "-n", "-t", "-ncmoe"} <= set(options("trace"))


def _definition(action: argparse.Action) -> tuple:
    return action.help, action.choices, action.default, action.metavar, action.type, action.nargs


@pytest.mark.parametrize("flag", ["--expert-quant", "--dense-quant", "--piecewise-graph", "--moe-pp-bypass",
                                  "--moe-policy"])
def test_bench_uses_the_definitions_generate_and_serve_use(flag):
    """One definition (cli/flags.py) per flag: help, choices, default and syntax cannot drift apart."""
    commands = [c for c in ("generate", "serve", "trace", "bench", "simulate", "auto") if flag in options(c)]
    defs = {c: _definition(options(c)[flag]) for c in commands}
    if flag == "--moe-policy":                     # bench's help names the placement it applies to
        defs = {c: d[1:] for c, d in defs.items()}
    assert "generate" in defs and len(set(defs.values())) == 1, defs


def test_bench_and_generate_vram_budgets_share_one_text_and_keep_their_syntax():
    gen, bench = options("generate")["--vram-budget"], options("bench")["--vram-budget"]
    assert gen.help.split(";")[0] == bench.help.split(";")[0] and "CUDA context included" in gen.help
    assert (gen.metavar, bench.metavar) == ("GiB|auto", "SIZE[,SIZE...]|auto")
    assert parse("bench", "--vram-budget", "16,24").vram_budget == "16,24"


def test_bench_keeps_every_flag_name_and_default():
    args = parse("bench")
    assert (args.expert_quant, args.dense_quant, args.policy, args.vram_budget, args.piecewise_graph) == \
        ("none", "auto", None, None, False)
    assert parse("bench", "--moe-policy", "decay").policy == "decay"


def test_synthetic_routing_help_lists_every_synthetic_preset():
    from hotexperts.trace.synthetic import PRESETS
    for command, flag in (("trace", "--synthetic"), ("bench", "--route-synthetic")):
        assert all(name in options(command)[flag].help for name in PRESETS), (command, flag)
