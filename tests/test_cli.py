"""The `hotexperts` CLI end to end on a tiny preset: streaming, summary, stop strings, errors -> exit 2."""

import re
import subprocess
import sys

import pytest

from hotexperts.cli import build_parser, main

TINY = ["generate", "--model", "preset:tiny-qwen3-moe", "--dtype", "float32", "--device", "cpu"]
SUMMARY = re.compile(r"prompt: (\d+) tokens, [\d.]+ tok/s \| generation: (\d+) tokens, [\d.]+ tok/s")


def run_main(capsys, *args):
    rc = main([*TINY, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_streams_text_and_prints_summary(capsys):
    rc, out, err = run_main(capsys, "--prompt", "Hello there", "--max-tokens", "12")
    assert rc == 0, err
    m = SUMMARY.search(err)
    assert m and int(m.group(1)) > 0 and 1 <= int(m.group(2)) <= 12
    assert out.endswith("\n") and "prompt:" not in out


def test_stop_string_cuts_output(capsys):
    rc, out, _ = run_main(capsys, "--prompt", "Once upon a time", "--max-tokens", "24")
    text = out[:-1]
    if len(text) < 6:
        pytest.skip("the random tiny model ended too early to pick a stop string")
    stop = text[3:6]
    rc, out2, _ = run_main(capsys, "--prompt", "Once upon a time", "--max-tokens", "24", "--stop", stop)
    assert rc == 0 and out2[:-1] == text[:text.index(stop)]


def test_chat_with_system_message(capsys, tmp_path):
    stats = tmp_path / "stats.json"
    rc, _, err = run_main(capsys, "--prompt", "Hi", "--system", "Be brief.", "--max-tokens", "4", "--stats",
                          "--stats-json", str(stats))
    assert rc == 0, err
    assert '"cuda_graph": false' in stats.read_text() and SUMMARY.search(err)
    assert "no expert cache in this placement" in err


def test_stats_heatmap_and_profile_of_the_cache(capsys, tmp_path):
    png, prof = tmp_path / "hits.png", tmp_path / "hot.json"
    rc, _, err = run_main(capsys, "--prompt", "Hello there", "--max-tokens", "6", "--moe-cache", "20slots",
                          "--stats", "--heatmap", str(png), "--save-profile", str(prof))
    assert rc == 0, err
    assert "hits" in err and "misses" in err and png.stat().st_size > 0 and prof.stat().st_size > 0
    rc, out, err = run_main(capsys, "--prompt", "x", "--max-tokens", "2", "--heatmap", str(png))
    assert rc == 2 and "--heatmap needs an expert cache" in err
    assert out == "" and "prompt:" not in err                     # refused before generating


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--temperature", "-1"], "error: temperature must be"),
    (["--prompt", "x", "--max-tokens", "100000"], r"error: prompt \(\d+ tokens\) \+ max_tokens \(100000\)"),
])
def test_user_errors_exit_2_without_traceback(capsys, args, message):
    rc, _, err = run_main(capsys, *args)
    assert rc == 2 and re.search(message, err) and "Traceback" not in err


def test_missing_model_dir_is_a_clean_error(capsys, tmp_path):
    rc = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err


def test_python_dash_m_help_lists_generate():
    res = subprocess.run([sys.executable, "-m", "hotexperts", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "generate" in res.stdout


def test_every_subcommand_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"generate", "make-model", "trace", "simulate", "calibrate", "auto", "bench",
                                "serve"}


def test_model_dir_without_tokenizer_is_a_clean_error(capsys, tmp_path):
    tf = pytest.importorskip("transformers")
    cfg = tf.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=16, num_hidden_layers=1, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=16, intermediate_size=32, max_position_embeddings=64)
    tf.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path)
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "x", "--device", "cpu",
               "--dtype", "float32"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no tokenizer" in err and "Traceback" not in err


def test_llama_cpp_habits_are_accepted(capsys):
    rc, out, err = run_main(capsys, "-p", "Hello", "-n", "3", "-ngl", "99", "-fa", "--no-mmap", "--temp", "0",
                            "-t", "1", "-c", "256")
    assert rc == 0, err
    assert SUMMARY.search(err)


@pytest.mark.parametrize("args, message", [
    (["-ngl", "0"], "-ngl 0: for a CPU-only run use --device cpu"),
    (["-ngl", "2"], "-ngl 2: hotexperts keeps all 4 dense layers on the GPU"),
    (["-ngl", "x"], "-ngl/--n-gpu-layers: expected an integer"),
    (["-fa", "off"], "-fa off: hotexperts has no non-fused attention path"),
    (["-fa", "sometimes"], "-fa/--flash-attn: expected on, off or auto"),
])
def test_llama_cpp_flags_that_mean_nothing_here_are_one_clear_error(capsys, args, message):
    rc, _, err = run_main(capsys, "-p", "x", "-n", "1", *args)
    assert rc == 2 and message in err and "Traceback" not in err


def test_commands_but_serve_need_no_server_stack():
    """make-model, bench and generate run where fastapi/uvicorn are not installed (the GPU machine)."""
    code = ("import sys; import hotexperts.cli as c; c.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', 'uvicorn', "
            "'pydantic'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
