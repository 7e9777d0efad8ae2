"""`hotexperts simulate` (cli/simulate.py): JSON and plots, byte budgets, the capacities it sweeps and the
table it prints."""

import argparse
import json

import pytest

from hotexperts.cli.simulate import add_parser, capacities, format_table, markdown_grid, run
from hotexperts.errors import HotExpertsError
from hotexperts.trace.heldout import sweep
from tests.trace.test_simulate import random_trace


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
