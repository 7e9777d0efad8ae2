"""`hotexperts simulate` (cli/simulate.py): JSON and plots, byte budgets, the capacities it sweeps, the
table it prints, and --prefetch (a trace with stored predictions, a clear error without)."""

import argparse
import json

import numpy as np
import pytest

from hotexperts.cli.simulate import add_parser, capacities, format_table, markdown_grid, run
from hotexperts.errors import HotExpertsError
from hotexperts.trace.heldout import sweep
from hotexperts.trace.simulate import PREDICTED
from tests.trace.test_simulate import oracle_guesses, random_trace


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["simulate", *argv])


def test_cli_json_and_plots(tmp_path, capsys):
    path = random_trace(n=120).save(tmp_path / "t.npz")
    args = parse(str(path), "--policies", "lru,static,belady", "--slots", "2,4",
                 "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "plots"))
    assert run(args) == 0
    doc = json.loads((tmp_path / "out.json").read_text())
    assert len(doc["results"]) == 6 and {r["policy"] for r in doc["results"]} == {"lru", "static", "belady"}
    assert (tmp_path / "plots" / "hit_rate.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "layer_heatmap.png").stat().st_size > 1000
    assert "belady" in capsys.readouterr().out


def test_cli_byte_budget_needs_expert_size(tmp_path):
    path = random_trace(n=30).save(tmp_path / "t.npz")
    with pytest.raises(HotExpertsError, match="expert size"):
        run(parse(str(path), "--budget", "1GiB"))
    args = parse(str(path), "--budget", "1MB", "--expert-mb", "0.25",
                 "--policies", "lru", "--profile", "rtx3060-ddr4")
    assert run(args) == 0




def test_capacities_default_to_fractions_of_the_experts_and_budgets_read_bytes_per_expert():
    t = random_trace(n=30)                                            # 16 experts
    assert capacities(None, None, t, 0) == ([1, 2, 4, 8], [])
    assert capacities("2,4", None, t, 0) == ([2, 4], [])
    assert capacities(None, "600,1KiB", t, 100) == ([], [600, 10])
    with pytest.raises(HotExpertsError, match="not both"):
        capacities("2", "600", t, 0)


def test_table_and_grid_show_every_policy_at_every_capacity():
    t = random_trace(n=120)
    rows = sweep(t, ("lru", "belady"), slots=[2], budgets=[6])
    table, grid = format_table(rows, t), markdown_grid(rows, t.num_experts)
    body = table.splitlines()[3:]                                     # the rows under the header
    assert [line.split()[:2] for line in body] == [["lru", "2/layer"], ["belady", "2/layer"],
                                                   ["lru", "6"], ["belady", "6"]]
    assert grid.splitlines()[0] == "| capacity | lru | belady |" and "(1.000)" in grid


def save_with_predictions(trace, path):
    """A trace .npz with a `predicted` array, as trace/learned.save_recorded writes it."""
    trace.save(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(path, **arrays, **{PREDICTED: oracle_guesses(trace)})
    return path


def test_cli_prefetch_prints_hit_rates_without_and_with_it(tmp_path, capsys):
    path = save_with_predictions(random_trace(n=200), tmp_path / "t.npz")
    args = parse(str(path), "--policies", "lru,decay", "--slots", "4", "--prefetch",
                 "--prefetch-cold-steps", "1", "--json", str(tmp_path / "out.json"))
    assert run(args) == 0
    out = capsys.readouterr().out
    table = out[out.index("next-layer prefetch:"):].splitlines()
    assert [line.split()[:2] for line in table[2:]] == [["lru", "4/layer"], ["decay", "4/layer"]]
    doc = json.loads((tmp_path / "out.json").read_text())
    plain, pf = doc["results"], doc["prefetch_results"]
    assert [r["policy"] for r in pf] == ["lru", "decay"] and pf[1]["prefetch"]["lands"] == "layer"
    assert pf[1]["hit_rate"] > plain[1]["hit_rate"] and pf[1]["prefetch_fills"] > 0
    assert all(r["prefetch"] is None and r["prefetch_fills"] == 0 for r in plain)


def test_cli_prefetch_needs_a_trace_with_predictions(tmp_path):
    path = random_trace(n=60).save(tmp_path / "plain.npz")
    with pytest.raises(HotExpertsError, match="carries next-layer predictions"):
        run(parse(str(path), "--policies", "lru", "--slots", "4", "--prefetch"))
