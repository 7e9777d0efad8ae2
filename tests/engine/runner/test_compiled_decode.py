"""The compiled decode step through the engine: Generator / Engine flags, the piecewise step (EagerCapture
on the CPU) with hybrid executors, the `--compile` CLI flag. Fast tests compile with aot_eager; the
end-to-end Inductor run is marked slow."""

import warnings

import pytest
import torch
from tiny_models import decode_steps

from hotexperts.cli import main
from hotexperts.engine.engine import Engine
from hotexperts.engine.generate import Generator
from hotexperts.engine.presets import build_in_memory
from hotexperts.engine.runner import compile_decode, compiled_stages
from hotexperts.engine.runner.cuda_graph import EagerDecodeStep
from hotexperts.engine.runner.piecewise import EagerCapture, PiecewiseDecodeStep
from hotexperts.engine.sampling import SamplingParams
from hotexperts.experts.build import build_executor
from hotexperts.experts.placement import Placement


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _generate(lm, placement="gpu", n=10, **kw):
    ex = build_executor(Placement.parse(placement), lm.store, lm.cfg, "cpu")
    gen = Generator(lm.model, ex, lm.cfg, "cpu", 64, **kw)
    return list(gen.generate([5, 6, 7, 8], SamplingParams(max_tokens=n)))


def test_generator_flag_turns_the_compiled_step_on_and_off():
    lm = build_in_memory("tiny-mixtral", dtype="float32", device="cpu")
    ref = _generate(lm)
    stages = compile_decode(lm.model, backend="aot_eager")
    assert _generate(lm, compile_decode=True) == ref           # True keeps the settings already chosen
    assert compiled_stages(lm.model) is stages and stages.ready and stages.graphs["layer"] == 1
    assert _generate(lm) == ref and compiled_stages(lm.model) is stages       # None: left as it is
    assert _generate(lm, compile_decode=False) == ref and compiled_stages(lm.model) is None


def test_a_new_generator_over_the_same_model_does_not_recompile():
    """The bench builds one Generator per placement over one model: the compiled stages are the model's,
    so Dynamo compiles them once (a fresh backend per Generator would recompile, and fail after 8)."""
    lm = build_in_memory("tiny-qwen3-moe", dtype="float32", device="cpu")
    stages = compile_decode(lm.model, backend="aot_eager")
    runs = [_generate(lm, n=3, compile_decode=True) for _ in range(10)]
    assert all(r == runs[0] for r in runs) and compiled_stages(lm.model) is stages
    assert stages.graphs == {"prepare": 1, "layer": 1, "head": 1} and not stages.failed


@pytest.mark.parametrize("preset, placement", [("tiny-qwen3-moe", "hot:4"), ("tiny-qwen2-moe", "cpu")])
def test_piecewise_with_compiled_stages_matches_eager(preset, placement):
    lm = build_in_memory(preset, dtype="float32", device="cpu")
    runs = []
    for compiled in (False, True):
        stages = compile_decode(lm.model, compiled, backend="aot_eager")
        ex = build_executor(Placement.parse(placement), lm.store, lm.cfg, "cpu")
        kv = lm.model.new_kv_cache(32)
        with torch.no_grad():
            lm.model(torch.tensor([5, 6, 7]), torch.arange(3), kv, ex, kv_len=3)
            ex.end_step()
        make = PiecewiseDecodeStep if compiled else EagerDecodeStep
        step = make(lm.model, kv, ex, "cpu", capture=EagerCapture) if compiled else make(
            lm.model, kv, ex, torch.device("cpu"))
        runs.append(decode_steps(step, ex, 9, 8))
    assert step.stages is not None and not step.failed and step.st is stages and stages.ready
    assert stages.graphs["layer"] == len({l.is_moe for l in lm.model.model.layers})
    (ta, ra), (tb, rb) = runs
    assert ta == tb
    for a, b in zip(ra, rb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_piecewise_falls_back_to_plain_stages_when_compiling_fails():
    lm = build_in_memory("tiny-qwen3-moe", dtype="float32", device="cpu")

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    stages = compile_decode(lm.model, backend=broken)
    ex = build_executor(Placement.parse("hot:4"), lm.store, lm.cfg, "cpu")
    step = PiecewiseDecodeStep(lm.model, lm.model.new_kv_cache(32), ex, "cpu", capture=EagerCapture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        toks, _ = decode_steps(step, ex, 9, 3)
    assert stages.failed and not step.failed and not step.st.compiled and len(toks) == 3
    assert any("capturing them uncompiled" in str(w.message) for w in caught)


def test_engine_flag_and_stats():
    eng = Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu", compile_decode=True)
    assert compiled_stages(eng.model) is not None
    assert eng.stats()["compiled_decode"]["graphs"] == {}                 # lazy: nothing compiled yet
    stages = compile_decode(eng.model, backend="aot_eager")               # fast stand-in for Inductor
    assert eng.warm_up() > 0 and stages.ready and stages.graphs["layer"] == 1
    assert eng.stats()["total"]["gen_tokens"] == 0 and eng.stats()["total"]["requests"] == 0
    off = Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu")
    assert compiled_stages(off.model) is None and off.stats()["compiled_decode"] is None


@pytest.mark.slow
def test_cli_compile_flag_gives_the_same_text(capsys, tmp_path):
    base = ["generate", "--model", "preset:tiny-qwen3-moe", "--dtype", "float32", "--device", "cpu",
            "--prompt", "Hello there", "--max-tokens", "12"]
    assert main(base) == 0
    eager = capsys.readouterr().out
    stats = tmp_path / "stats.json"
    assert main([*base, "--compile", "--stats-json", str(stats)]) == 0
    assert capsys.readouterr().out == eager
    text = stats.read_text()
    assert '"compiled": true' in text and '"layer": 1' in text
