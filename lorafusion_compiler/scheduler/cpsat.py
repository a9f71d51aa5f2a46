"""CP-SAT model for one bin-packing subproblem (sizes and capacity in padding units).

Items of equal size are interchangeable for capacity, so the model counts them:
``n[s, b]`` = how many items of size ``s`` go to bin ``b``. That keeps the model small
(distinct sizes x bins integers) even for hundreds of samples. Objective, lexicographic
through weights: fewest used bins, then the lightest used bin as light as possible.

Determinism: one worker, a fixed ``random_seed``, and the *deterministic* time limit
(``max_deterministic_time``, CP-SAT's machine-independent work measure) set to
``DETERMINISTIC_FRACTION`` of the caller's wall budget. The wall-clock limit
``max_time_in_seconds`` is only a safety net (``WALL_SAFETY_FACTOR`` x budget + 0.1 s):
on the 2-core development box one deterministic unit took 2-3 wall seconds plus about
10 ms of per-call overhead, so the deterministic limit binds first and the same inputs
give the same packing; only a machine or load many times slower could hit the net.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

__all__ = ["DETERMINISTIC_FRACTION", "WALL_SAFETY_FACTOR", "solve_bin_packing"]

DETERMINISTIC_FRACTION = 0.25
"""Deterministic-time limit as a fraction of the wall budget (see module docstring)."""

WALL_SAFETY_FACTOR = 4.0
"""Wall-clock safety net, as a multiple of the wall budget (plus 0.1 s)."""


def solve_bin_packing(
    sizes: Sequence[int],
    capacity: int,
    hint: list[list[int]],
    *,
    time_limit_s: float,
    seed: int,
) -> tuple[list[list[int]] | None, str]:
    """Solve one subproblem with CP-SAT, warm-started from ``hint`` (bins of item indices).

    At most ``len(hint)`` bins are offered. Returns ``(bins, status)`` with status
    ``"OPTIMAL"`` or ``"FEASIBLE"``, or ``(None, reason)`` when CP-SAT is not importable
    or found no solution within its budget ``time_limit_s`` (wall seconds; see module docstring).
    """
    try:
        from ortools.sat.python import cp_model
    except ImportError:
        return None, "UNAVAILABLE"

    counts = Counter(sizes)
    distinct = sorted(counts, reverse=True)
    num_bins = len(hint)
    total = sum(sizes)
    model = cp_model.CpModel()
    count = {
        (s, b): model.new_int_var(0, min(counts[s], capacity // s), f"n_{s}_{b}")
        for s in distinct
        for b in range(num_bins)
    }
    used = [model.new_bool_var(f"used_{b}") for b in range(num_bins)]
    load = [model.new_int_var(0, capacity, f"load_{b}") for b in range(num_bins)]
    lightest = model.new_int_var(0, capacity, "lightest")
    for s in distinct:
        model.add(sum(count[s, b] for b in range(num_bins)) == counts[s])
    for b in range(num_bins):
        model.add(load[b] == sum(s * count[s, b] for s in distinct))
        model.add(load[b] <= capacity * used[b])
        model.add(load[b] >= min(distinct) * used[b])
        if b + 1 < num_bins:
            # Symmetry breaking: used bins first, loads non-increasing.
            model.add(used[b] >= used[b + 1])
            model.add(load[b] >= load[b + 1])
            model.add(lightest >= load[b]).only_enforce_if([used[b], ~used[b + 1]])
        else:
            model.add(lightest >= load[b]).only_enforce_if(used[b])
    # Redundant bounds that let the solver prove optimality quickly.
    model.add(sum(used) * capacity >= total)
    model.add(lightest + capacity * sum(used) >= total + capacity)
    model.minimize((capacity + 1) * sum(used) + lightest)

    hint_loads = sorted(
        ([sizes[i] for i in items] for items in hint), key=lambda b: -sum(b)
    )
    for b in range(num_bins):
        per_size = Counter(hint_loads[b])
        for s in distinct:
            model.add_hint(count[s, b], per_size.get(s, 0))
        model.add_hint(used[b], 1)
        model.add_hint(load[b], sum(hint_loads[b]))
    model.add_hint(lightest, sum(hint_loads[-1]))

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = seed
    solver.parameters.max_deterministic_time = DETERMINISTIC_FRACTION * time_limit_s
    solver.parameters.max_time_in_seconds = WALL_SAFETY_FACTOR * time_limit_s + 0.1
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, solver.status_name(status)

    by_size: dict[int, list[int]] = {s: [] for s in distinct}
    for index, size in enumerate(sizes):
        by_size[size].append(index)
    bins = []
    for b in range(num_bins):
        if not solver.boolean_value(used[b]):
            continue
        items = []
        for s in distinct:
            take = solver.value(count[s, b])
            items.extend(by_size[s][:take])
            del by_size[s][:take]
        bins.append(items)
    return bins, "OPTIMAL" if status == cp_model.OPTIMAL else "FEASIBLE"
