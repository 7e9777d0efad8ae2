"""Help written for users (issue 19, must-have 4): no internal docstrings, every default shown, presets listed
where --model is taken, --moe-policy and --seed explained."""

import re

import pytest

from hotexperts.cli import build_parser
from hotexperts.cli.flags import HelpFormatter, shows_default
from hotexperts.engine.presets import PRESETS

SUBPARSERS = next(a for a in build_parser()._actions if a.dest == "command").choices
# what only a module docstring says: file paths, class names, the contract notation
INTERNAL = re.compile(r"\b\w+/\w+\.py\b|RoutingTrace|CachePlanner|SimulatedCache|->|add_parser")


def help_of(command: str) -> str:
    return SUBPARSERS[command].format_help()


@pytest.mark.parametrize("command", sorted(SUBPARSERS))
def test_help_prints_no_internal_docstring(command):
    text = help_of(command)
    assert not INTERNAL.search(text.split("options:")[0]), text[:600]     # the description part
    assert SUBPARSERS[command].formatter_class is HelpFormatter


@pytest.mark.parametrize("command", sorted(SUBPARSERS))
def test_every_option_has_help_and_shows_its_default(command):
    formatter = HelpFormatter(prog="x")
    for action in SUBPARSERS[command]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = formatter._get_help_string(action)
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        if shows_default(action):
            assert "default" in text.lower(), f"{command} {action.option_strings[0]}: {text}"


@pytest.mark.parametrize("command", ["generate", "serve", "trace", "bench"])
def test_presets_are_listed_where_model_is_taken(command):
    text = re.sub(r"\s+", " ", help_of(command))
    assert all(name in text for name in PRESETS) and "preset:NAME" in text


def test_make_model_describes_every_preset():
    text = help_of("make-model")
    assert all(f"  {name} " in text for name in PRESETS)


def test_moe_policy_and_seed_are_explained():
    gen = re.sub(r"\s+", " ", help_of("generate"))
    for policy in ("lru (least recently used)", "window-lfu (most used", "decay (", "static (", "auto ("):
        assert policy in gen
    assert "random seed of sampling" in gen
    bench = re.sub(r"\s+", " ", help_of("bench"))
    assert "random seed of the random weights and the synthetic routing (default: 0)" in bench


def test_bench_help_leads_with_what_a_cpu_run_does():
    text = help_of("bench")
    assert "emulated" in text and "PREDICTED" in text and "examples:" in text
    assert "(default: pp512,tg128)" in re.sub(r"\s+", " ", text)
