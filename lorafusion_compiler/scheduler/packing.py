"""Packing of one (group, step) subproblem into microbatches ("bins").

Sizes and capacity are in *units* of the padding multiple (a sample of ``len`` tokens
occupies ``ceil(len / pad_multiple)`` units; a microbatch holds ``capacity / pad_multiple``).
Objective, lexicographic: fewest bins, then the smallest possible lightest bin (the
"leftover" that the merge pass absorbs into other microbatches).

Pipeline per subproblem: two greedy heuristics (first-fit decreasing, and a
minimum-slack variant that completes each bin with an exact subset sum); if the better
one meets both lower bounds (``ceil(total / cap)`` bins, lightest bin
``max(total - (k - 1) * cap, smallest item)``) it is optimal and no solver is needed.
Otherwise CP-SAT is warm-started from it under a deterministic time budget.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .cpsat import solve_bin_packing

__all__ = [
    "MIN_SOLVER_SHARE_S",
    "STATUS_ORDER",
    "PackReport",
    "PackResult",
    "first_fit_decreasing",
    "max_subset_sum",
    "minimum_slack_greedy",
    "pack",
    "pack_all",
]

MIN_SOLVER_SHARE_S = 0.05
"""Smallest CP-SAT budget (wall seconds) worth a call; caps the number of calls per plan."""

STATUS_ORDER = ("OPTIMAL", "FEASIBLE", "GREEDY")
"""Subproblem statuses from best to worst; a plan reports the worst one it contains."""


@dataclass(kw_only=True)
class PackResult:
    """Bins of one subproblem: lists of item indices, heaviest bin first."""

    bins: list[list[int]]
    """Item indices (into the subproblem's size list) per bin, sorted by load, descending."""
    status: str
    """``OPTIMAL`` (proved by bounds or CP-SAT), ``FEASIBLE`` (CP-SAT, not proved) or ``GREEDY``."""
    greedy_bins: int
    """Number of bins of the best greedy packing (for comparison with the solver)."""
    solver_called: bool
    """Whether CP-SAT was run on this subproblem."""


@dataclass(kw_only=True)
class PackReport:
    """Results of all subproblems plus timing."""

    results: list[PackResult]
    """One result per subproblem, in input order."""
    solve_time_s: float
    """Wall time spent packing (greedy + CP-SAT), seconds."""


def max_subset_sum(sizes: Sequence[int], limit: int) -> list[int]:
    """Indices of a subset of ``sizes`` with the largest sum <= ``limit`` (exact, bitset DP).

    Among optimal subsets, later items are left out whenever possible, so with sizes
    sorted in decreasing order the larger items are preferred. O(len(sizes)) big-int ops.
    """
    if limit <= 0:
        return []
    mask = (1 << (limit + 1)) - 1
    reach = [1]
    for size in sizes:
        reach.append((reach[-1] | (reach[-1] << size)) & mask)
    target = reach[-1].bit_length() - 1
    chosen = []
    for i in range(len(sizes), 0, -1):
        if not (reach[i - 1] >> target) & 1:
            chosen.append(i - 1)
            target -= sizes[i - 1]
    return chosen[::-1]


def _decreasing(sizes: Sequence[int]) -> list[int]:
    return sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Classic FFD: each item, largest first, goes to the first bin with room."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for item in _decreasing(sizes):
        for b, load in enumerate(loads):
            if load + sizes[item] <= capacity:
                bins[b].append(item)
                loads[b] += sizes[item]
                break
        else:
            bins.append([item])
            loads.append(sizes[item])
    return bins


def minimum_slack_greedy(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Open bins one at a time: the largest remaining item, then an exact max subset sum of the rest."""
    remaining = _decreasing(sizes)
    bins = []
    while remaining:
        first, rest = remaining[0], remaining[1:]
        picked = max_subset_sum([sizes[i] for i in rest], capacity - sizes[first])
        chosen = [first, *(rest[k] for k in picked)]
        bins.append(chosen)
        taken = set(chosen)
        remaining = [i for i in remaining if i not in taken]
    return bins


def _canonical(bins: list[list[int]], sizes: Sequence[int]) -> list[list[int]]:
    """Sort items inside bins, then bins by load descending (ties: smallest item index)."""
    ordered = [sorted(b) for b in bins if b]
    return sorted(ordered, key=lambda b: (-sum(sizes[i] for i in b), b[0]))


def _quality(bins: list[list[int]], sizes: Sequence[int]) -> tuple[int, int]:
    return len(bins), min(sum(sizes[i] for i in b) for b in bins)


def _lower_bounds(sizes: Sequence[int], capacity: int) -> tuple[int, int]:
    """(fewest bins, lightest-bin lower bound when using that many bins)."""
    total = sum(sizes)
    bins = -(-total // capacity)
    return bins, max(total - (bins - 1) * capacity, min(sizes))


def _greedy(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    candidates = [
        _canonical(first_fit_decreasing(sizes, capacity), sizes),
        _canonical(minimum_slack_greedy(sizes, capacity), sizes),
    ]
    return min(candidates, key=lambda b: _quality(b, sizes))


def _is_proved(greedy: list[list[int]], sizes: Sequence[int], capacity: int) -> bool:
    return _quality(greedy, sizes) == _lower_bounds(sizes, capacity)


def _check(sizes: Sequence[int], capacity: int) -> None:
    if not sizes:
        raise ValueError("a packing subproblem needs at least one item")
    if max(sizes) > capacity:
        raise ValueError(f"an item of {max(sizes)} units exceeds the capacity of {capacity} units")


def _improve(
    sizes: Sequence[int],
    capacity: int,
    greedy: list[list[int]],
    *,
    time_limit_s: float,
    seed: int,
    use_solver: bool,
) -> PackResult:
    """Return the greedy packing if proved optimal, else try CP-SAT warm-started from it."""
    if _is_proved(greedy, sizes, capacity):
        return PackResult(bins=greedy, status="OPTIMAL", greedy_bins=len(greedy), solver_called=False)
    if not use_solver or time_limit_s <= 0:
        return PackResult(bins=greedy, status="GREEDY", greedy_bins=len(greedy), solver_called=False)
    solved, status = solve_bin_packing(sizes, capacity, greedy, time_limit_s=time_limit_s, seed=seed)
    if solved is None:
        return PackResult(bins=greedy, status="GREEDY", greedy_bins=len(greedy), solver_called=True)
    solved = _canonical(solved, sizes)
    best = solved if _quality(solved, sizes) <= _quality(greedy, sizes) else greedy
    return PackResult(bins=best, status=status, greedy_bins=len(greedy), solver_called=True)


def pack(
    sizes: Sequence[int],
    capacity: int,
    *,
    time_limit_s: float,
    seed: int,
    use_solver: bool = True,
) -> PackResult:
    """Pack one subproblem (sizes and capacity in padding units; time limit in seconds)."""
    _check(sizes, capacity)
    greedy = _greedy(sizes, capacity)
    return _improve(sizes, capacity, greedy, time_limit_s=time_limit_s, seed=seed, use_solver=use_solver)


def pack_all(
    problems: Sequence[Sequence[int]],
    capacity: int,
    *,
    time_limit_s: float,
    seed: int,
    use_solver: bool = True,
) -> PackReport:
    """Pack many subproblems; the solver budget ``time_limit_s`` (seconds) is shared.

    Subproblems whose greedy packing is not provably optimal are ranked by how far the
    greedy packing is from the bounds (extra bins first, then lightest-bin gap); at most
    ``time_limit_s / MIN_SOLVER_SHARE_S`` of them, best ranked first, get CP-SAT with an
    even share of the budget, the rest keep the greedy packing. Everything is decided
    before any solve, so results do not depend on timing.
    """
    start = time.perf_counter()
    for sizes in problems:
        _check(sizes, capacity)
    greedies = [_greedy(sizes, capacity) for sizes in problems]

    gaps = []  # (extra bins, extra lightest-bin units) of greedy over the lower bounds
    for sizes, greedy in zip(problems, greedies, strict=True):
        bins, lightest = _quality(greedy, sizes)
        bound_bins, bound_lightest = _lower_bounds(sizes, capacity)
        gaps.append((bins - bound_bins, lightest - bound_lightest))
    unproved = [k for k, g in enumerate(gaps) if g != (0, 0)]
    ranked = sorted(unproved, key=lambda k: (-gaps[k][0], -gaps[k][1], k))
    chosen = set(ranked[: int(time_limit_s / MIN_SOLVER_SHARE_S)])
    share = time_limit_s / len(chosen) if chosen else 0.0
    results = [
        _improve(
            sizes, capacity, greedy, time_limit_s=share if k in chosen else 0.0, seed=seed, use_solver=use_solver
        )
        for k, (sizes, greedy) in enumerate(zip(problems, greedies, strict=True))
    ]
    return PackReport(results=results, solve_time_s=time.perf_counter() - start)
