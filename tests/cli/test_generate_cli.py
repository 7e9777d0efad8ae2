"""generate's reconciled output flags (issue 19): --plots DIR beside --heatmap PNG, --json beside the old
--stats-json, refused before generating without a cache; the small messages a newcomer met."""

import json

from hotexperts.cli import main

TINY = ["generate", "-m", "preset:tiny-qwen3-moe", "--dtype", "fp32", "--device", "cpu"]


def test_plots_dir_holds_the_heatmap_and_json_the_stats(tmp_path, capsys):
    rc = main([*TINY, "-p", "Hello", "-n", "3", "--moe-cache", "20slots", "--plots", str(tmp_path / "plots"),
               "--json", str(tmp_path / "s.json")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "plots" / "layer_heatmap.png").stat().st_size > 0
    assert "cache" in json.loads((tmp_path / "s.json").read_text())


def test_plots_without_a_cache_is_refused_before_generating(tmp_path, capsys):
    rc = main([*TINY, "-p", "Hello", "-n", "3", "--plots", str(tmp_path / "p")])
    out, err = capsys.readouterr()
    assert rc == 2 and "--plots needs an expert cache" in err and out == "" and "prompt:" not in err


def test_a_prompt_that_fills_a_tiny_context_says_so(capsys):
    rc = main([*TINY, "-p", "Hello there my friend, how are you today?", "-c", "8", "-n", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "the prompt alone fills the context" in err and "at most 0" not in err
