"""Packing: greedy heuristics, exact subset sums, CP-SAT versus greedy, statuses."""

from __future__ import annotations

import itertools
import random
import sys

import pytest
from helpers import requires_ortools

from lorafusion_compiler.scheduler.packing import (
    first_fit_decreasing,
    max_subset_sum,
    minimum_slack_greedy,
    pack,
    pack_all,
)

# Instances where both greedy heuristics need one bin more than the optimum.
GREEDY_SUBOPTIMAL = [
    (34, [20, 7, 16, 12, 16, 11, 6, 16, 21, 8], 4),
    (24, [7, 11, 10, 16, 10, 6, 13, 10, 9, 5, 13, 7], 5),
    (22, [6, 6, 10, 5, 8, 9, 11, 10], 3),
    (16, [5, 3, 4, 8, 3, 5, 6, 9, 10, 10], 4),
]


def assert_valid_packing(bins, sizes, capacity):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= capacity for b in bins)


def test_max_subset_sum_matches_brute_force():
    rng = random.Random(1)
    for _ in range(300):
        sizes = [rng.randint(1, 30) for _ in range(rng.randint(0, 9))]
        limit = rng.randint(0, 80)
        best = max(
            (sum(c) for r in range(len(sizes) + 1) for c in itertools.combinations(sizes, r) if sum(c) <= limit),
            default=0,
        )
        picked = max_subset_sum(sizes, limit)
        assert len(set(picked)) == len(picked)
        assert sum(sizes[i] for i in picked) == best


def test_greedy_heuristics_are_valid():
    rng = random.Random(2)
    for _ in range(200):
        capacity = rng.randint(5, 64)
        sizes = [rng.randint(1, capacity) for _ in range(rng.randint(1, 40))]
        for heuristic in (first_fit_decreasing, minimum_slack_greedy):
            bins = heuristic(sizes, capacity)
            assert_valid_packing(bins, sizes, capacity)
            assert len(bins) >= -(-sum(sizes) // capacity)


@requires_ortools
@pytest.mark.parametrize(("capacity", "sizes", "optimum"), GREEDY_SUBOPTIMAL)
def test_cpsat_beats_greedy_where_greedy_is_suboptimal(capacity, sizes, optimum):
    result = pack(sizes, capacity, time_limit_s=2.0, seed=0)
    assert result.solver_called
    assert result.status == "OPTIMAL"
    assert len(result.bins) == optimum < result.greedy_bins
    assert_valid_packing(result.bins, sizes, capacity)
    greedy_only = pack(sizes, capacity, time_limit_s=2.0, seed=0, use_solver=False)
    assert greedy_only.status == "GREEDY" and len(greedy_only.bins) == result.greedy_bins


def test_cpsat_result_never_worse_than_greedy():
    rng = random.Random(3)
    called = 0
    for _ in range(60):
        capacity = rng.randint(10, 40)
        sizes = [rng.randint(capacity // 6 + 1, capacity * 2 // 3) for _ in range(rng.randint(3, 14))]
        result = pack(sizes, capacity, time_limit_s=0.2, seed=0)
        called += result.solver_called
        assert_valid_packing(result.bins, sizes, capacity)
        assert len(result.bins) <= result.greedy_bins
        loads = [sum(sizes[i] for i in b) for b in result.bins]
        assert loads == sorted(loads, reverse=True), "bins are ordered heaviest first"
    assert called > 10


def test_bound_proves_greedy_optimal_without_solver():
    # 3 bins needed; greedy fills two exactly and leaves the 4-unit leftover = lower bound.
    result = pack([6, 4, 5, 5, 3, 3, 4], 10, time_limit_s=1.0, seed=0)
    assert (result.status, result.solver_called) == ("OPTIMAL", False)
    assert sorted(sum([6, 4, 5, 5, 3, 3, 4][i] for i in b) for b in result.bins) == [10, 10, 10]


def test_leftover_is_minimized():
    # 25 units into capacity 10: 3 bins; the lightest bin can hold just 5 units.
    sizes = [5, 5, 5, 5, 5]
    result = pack(sizes, 10, time_limit_s=1.0, seed=0)
    assert [sum(sizes[i] for i in b) for b in result.bins] == [10, 10, 5]


def test_pack_all_is_deterministic_and_keeps_order():
    rng = random.Random(4)
    problems = [[rng.randint(3, 20) for _ in range(rng.randint(2, 12))] for _ in range(15)]
    first = pack_all(problems, 24, time_limit_s=0.5, seed=7)
    second = pack_all(problems, 24, time_limit_s=0.5, seed=7)
    assert [r.bins for r in first.results] == [r.bins for r in second.results]
    for sizes, result in zip(problems, first.results, strict=True):
        assert_valid_packing(result.bins, sizes, 24)


def test_oversized_item_is_rejected():
    with pytest.raises(ValueError, match="exceeds the capacity"):
        pack([3, 11], 10, time_limit_s=0.1, seed=0)


@requires_ortools
def test_solver_calls_are_capped_by_the_budget():
    capacity, sizes, _ = GREEDY_SUBOPTIMAL[3]
    report = pack_all([sizes] * 12, capacity, time_limit_s=0.1, seed=0)  # greedy cannot prove any
    # 0.1 s / MIN_SOLVER_SHARE_S (0.05 s) = 2 calls; the rest keep the greedy packing.
    assert sum(r.solver_called for r in report.results) == 2
    assert sum(r.status == "GREEDY" for r in report.results) == 10


def test_greedy_fallback_when_cpsat_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "ortools.sat.python", None)  # the import now fails
    capacity, sizes, optimum = GREEDY_SUBOPTIMAL[0]
    result = pack(sizes, capacity, time_limit_s=1.0, seed=0)
    assert result.solver_called and result.status == "GREEDY"
    assert len(result.bins) == result.greedy_bins == optimum + 1
