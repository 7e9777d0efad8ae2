"""bench/workload.parse_counts: the count lists of --parallel (bench/concurrency.py) and --verify-t
(bench/verify.py), one parser: sorted, 1 added, bounded, a clear message naming the flag."""

import pytest

from hotexperts.bench import concurrency as bc
from hotexperts.bench import verify as bv
from hotexperts.bench.workload import parse_counts
from hotexperts.errors import HotExpertsError


def test_parse_counts_sorts_adds_the_baseline_and_bounds():
    assert parse_counts("4,2, ,8", "--n", "thing", 8) == [1, 2, 4, 8]
    assert parse_counts(None, "--n", "thing", 8) == [] and parse_counts("", "--n", "thing", 8) == []
    with pytest.raises(HotExpertsError, match=r"--n takes thing counts like 1,2,4,8, got 'x'"):
        parse_counts("x", "--n", "thing", 8)
    with pytest.raises(HotExpertsError, match=r"--n values must be in \[1, 8\]"):
        parse_counts("9", "--n", "thing", 8)


@pytest.mark.parametrize("parse, flag", [(bc.parse_parallel, "--parallel"),
                                         (bv.parse_verify_ts, "--verify-t")])
def test_the_bench_flags_parse_through_it(parse, flag):
    assert parse("4,2") == [1, 2, 4] and parse(None) == []
    for bad in ("0,2", "17", "two"):
        with pytest.raises(HotExpertsError, match=flag):
            parse(bad)
