"""The file commands' flags (cli/simulate.py, cli/auto.py, cli/make_model.py): simulate and auto read the raw
trace files bench --route-trace reads, simulate prints progress per capacity, make-model takes bf16."""

import json

import pytest

from hotexperts.cli import main
from hotexperts.trace.synthetic import generate, preset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def write_raw_jsonl(path, trace) -> None:
    """The trace in the raw vLLM/Mixtral form (*_routing.jsonl) that bench --route-trace imports."""
    with open(path, "w") as f:
        for tok in range(trace.num_tokens):
            for layer in range(trace.num_layers):
                f.write(json.dumps(dict(dataset="d", problem_id=0, layer=layer, token_idx=tok,
                                        experts=[int(x) for x in trace.ids[tok, layer]],
                                        gating_probs=[0.5] * trace.top_k)) + "\n")


@pytest.fixture
def traces(tmp_path):
    from dataclasses import replace

    t = generate(replace(preset("mixtral-8x7b"), num_layers=2), num_tokens=200, seed=1)
    raw = tmp_path / "x_routing.jsonl"
    write_raw_jsonl(raw, t)
    return raw


def test_simulate_reads_a_raw_trace_and_prints_progress(traces, capsys):
    rc = main(["simulate", str(traces), "--policies", "lru,belady", "--slots", "2,4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "lru" in out and "belady" in out
    assert "simulate: 1/2 capacities done (2 slots per layer)" in err and "simulate: 2/2" in err


def test_simulate_of_the_raw_file_equals_simulate_of_its_npz(traces, tmp_path, capsys):
    from hotexperts.trace.import_shared import import_trace

    npz = import_trace(traces).save(tmp_path / "same.npz")
    tables = []
    for path in (traces, npz):
        assert main(["simulate", str(path), "--policies", "lru,decay", "--moe-cache", "6slots"]) == 0
        tables.append(capsys.readouterr().out.split("\n", 1)[1])     # below the title line naming the file
    assert tables[0] == tables[1]


def test_auto_reads_a_raw_trace_with_generates_cache_syntax(traces, tmp_path, capsys, monkeypatch):
    import hotexperts.trace.auto as auto

    monkeypatch.setattr(auto, "GRID", {"lru": [{}], "decay": [{"half_life": 32.0}]})
    out = tmp_path / "p.json"
    rc = main(["auto", str(traces), "--moe-cache", "6slots", "--model-shape", "mixtral-8x7b",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.exists() and "--moe-profile" in capsys.readouterr().out


def test_make_model_writes_bf16_weights(tmp_path, capsys):
    from safetensors import safe_open

    rc = main(["make-model", "--preset", "tiny-olmoe", "--out", str(tmp_path / "m"), "--dtype", "bf16",
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        name = next(iter(f.keys()))
        assert str(f.get_tensor(name).dtype) == "torch.bfloat16"


def test_make_model_help_lists_every_gguf_type_the_writer_accepts():
    from hotexperts.cli import build_parser
    from hotexperts.engine.gguf_export import QUANTS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["make-model"]
    text = next(a for a in sub._actions if "--quant" in a.option_strings).help
    assert all(f" {q} " in f" {text} " or f" {q}" in text for q in (*QUANTS, "q4_k_m"))
    assert {"iq4_nl", "iq4_xs", "mxfp4"} <= set(text.replace("(", " ").split())
