"""Adapter grouping: which jobs share packing subproblems and advance their steps together.

Jobs of one group are packed together step by step (round ``r`` of a group packs step
``r`` of each of its jobs), and the sequencer emits the groups' rounds in turn. Two
consecutive steps of a job are therefore separated by the microbatches of the other
groups, which must number at least S-1 for the pipeline never to wait on the job's
previous backward + optimizer step (the "bubble lemma" under 1F1B with S stages).

Groups are formed by longest-processing-time balancing of the mean padded tokens per
step (the heaviest job goes to the lightest group), which pairs long jobs with short
ones and generalizes the published pairs to any group size.
"""

from __future__ import annotations

from collections.abc import Sequence

from .jobs import Job

__all__ = ["balanced_partition", "group_jobs", "stagger_holds"]


def _step_load(job: Job, pad_multiple: int) -> float:
    """Mean padded tokens per optimizer step of ``job`` (tokens)."""
    return job.total_padded_tokens(pad_multiple) / job.num_steps


def balanced_partition(loads: Sequence[float], num_groups: int) -> list[list[int]]:
    """Split item indices into ``num_groups`` groups with balanced total load (LPT rule).

    Items are taken heaviest first (ties by index) and each goes to the currently lightest
    group (ties by group index). Indices inside a group are returned in ascending order.
    """
    if not 1 <= num_groups <= len(loads):
        raise ValueError(f"num_groups must be in [1, {len(loads)}], got {num_groups}")
    totals = [0.0] * num_groups
    members: list[list[int]] = [[] for _ in range(num_groups)]
    for index in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        target = min(range(num_groups), key=lambda g: (totals[g], g))
        totals[target] += loads[index]
        members[target].append(index)
    return [sorted(group) for group in members]


def stagger_holds(group_loads: Sequence[float], capacity: int, stages: int) -> bool:
    """True if, for every group, the other groups fill at least ``stages - 1`` microbatches per round.

    ``group_loads`` are padded tokens per round, ``capacity`` tokens per microbatch.
    """
    microbatches = [max(1, -(-int(load) // capacity)) for load in group_loads]
    total = sum(microbatches)
    return all(total - own >= stages - 1 for own in microbatches)


def group_jobs(
    jobs: Sequence[Job],
    *,
    capacity: int,
    pad_multiple: int,
    stages: int,
    max_group_microbatches: int = 8,
) -> list[list[str]]:
    """Partition jobs into groups (lists of job names, in input order).

    The number of groups starts at the smallest count keeping each group's round at
    about ``max_group_microbatches`` microbatches (which bounds the packing subproblem
    size) and grows until the stagger condition holds for every group, or until every
    job is alone. If even then it fails (e.g. a single job), the sequencer inserts no-op
    microbatches where needed.
    """
    loads = [_step_load(job, pad_multiple) for job in jobs]
    per_group = max_group_microbatches * capacity
    num_groups = max(1, min(len(jobs), -(-int(sum(loads)) // per_group)))
    while True:
        partition = balanced_partition(loads, num_groups)
        group_loads = [sum(loads[i] for i in group) for group in partition]
        if num_groups == len(jobs) or stagger_holds(group_loads, capacity, stages):
            return [[jobs[i].name for i in group] for group in partition]
        num_groups += 1
