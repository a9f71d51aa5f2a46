"""End-to-end properties of schedule(): invariants on random instances, targets, determinism."""

from __future__ import annotations

import random

import pytest
from helpers import requires_ortools

from lorafusion_compiler.scheduler import Job, Schedule, ScheduleError, sample_lengths, schedule


def test_500_random_instances_hold_all_invariants(make_instance, check_plan):
    rng = random.Random(20240611)
    statuses = set()
    for k in range(500):
        jobs, settings = make_instance(rng)
        # The solver is not under test here: greedy mostly, CP-SAT with a tiny budget every 10th.
        solver = "cpsat" if k % 10 == 0 else "greedy"
        plan = schedule(jobs, solver=solver, time_limit_s=0.02, **settings)
        check_plan(plan)
        plan.verify()
        assert plan.stats.bins >= plan.stats.lower_bound
        assert plan.stats.bins + plan.stats.noops == len(plan.microbatches)
        statuses.add(plan.stats.solver_status)
    assert "GREEDY" in statuses and "OPTIMAL" in statuses


def test_hundred_jobs_target(hundred_jobs, check_plan):
    plan = schedule(hundred_jobs, capacity=8192, pad_multiple=128, stages=4, seed=0)
    check_plan(plan)
    assert sum(len(job.lengths) for job in hundred_jobs) == 10_000
    assert plan.stats.bins <= plan.stats.lower_bound + 1
    assert plan.stats.plan_time_s <= 2.0
    assert plan.stats.noops == 0


def _mixed_jobs(global_batch_size: int = 32) -> list[Job]:
    names = ("xsum", "cnn_dailymail", "wikisum", "mix")
    return [
        Job(name=name, lengths=sample_lengths(name, 512, seed=k), global_batch_size=global_batch_size)
        for k, name in enumerate(names)
    ]


def test_four_mixed_jobs_bubble_target_and_single_job_is_bubblier():
    jobs = _mixed_jobs()
    together = schedule(jobs, capacity=8192, pad_multiple=128, stages=4)
    assert together.stats.bubble_ratio <= 0.12
    for job in jobs:
        alone = schedule([job], capacity=8192, pad_multiple=128, stages=4)
        # A lone job must flush the pipeline between steps: S-1 no-ops each time.
        assert alone.stats.noops == (job.num_steps - 1) * 3
        assert alone.stats.bubble_ratio > together.stats.bubble_ratio + 0.2


def test_groups_can_exceed_pairs():
    jobs = [Job(name=f"small{k}", lengths=[300] * 32, global_batch_size=8) for k in range(12)]
    plan = schedule(jobs, capacity=8192, pad_multiple=128, stages=4)
    assert max(len(group) for group in plan.stats.groups) > 2
    assert plan.stats.noops == 0


def _instance_needing_cpsat() -> list[Job]:
    return [
        Job(name=f"w{k}", lengths=sample_lengths("wikisum", 48, seed=100 + k, max_tokens=4096), global_batch_size=12)
        for k in range(6)
    ]


def test_same_inputs_and_seed_give_the_same_schedule():
    jobs = _instance_needing_cpsat()
    first = schedule(jobs, capacity=4096, pad_multiple=128, stages=4, seed=3, time_limit_s=1.0)
    second = schedule(jobs, capacity=4096, pad_multiple=128, stages=4, seed=3, time_limit_s=1.0)
    assert first.stats.solver_calls > 0
    assert [mb.items for mb in first.microbatches] == [mb.items for mb in second.microbatches]
    assert [mb.padded_tokens for mb in first.microbatches] == [mb.padded_tokens for mb in second.microbatches]


@requires_ortools
def test_cpsat_never_packs_worse_than_greedy():
    jobs = _instance_needing_cpsat()
    cpsat = schedule(jobs, capacity=4096, pad_multiple=128, stages=4, time_limit_s=1.0)
    greedy = schedule(jobs, capacity=4096, pad_multiple=128, stages=4, solver="greedy")
    assert cpsat.stats.packed_bins <= cpsat.stats.greedy_bins == greedy.stats.packed_bins
    assert cpsat.stats.solver_status in ("OPTIMAL", "FEASIBLE")
    assert greedy.stats.solver_calls == 0


def test_verify_catches_a_tampered_plan():
    plan = schedule(_mixed_jobs(), capacity=8192, pad_multiple=128, stages=4)
    tampered = Schedule(
        microbatches=plan.microbatches[::-1],
        jobs=plan.jobs,
        config=plan.config,
        stats=plan.stats,
        simulation=plan.simulation,
    )
    with pytest.raises(ScheduleError, match="before step"):
        tampered.verify()


@pytest.mark.parametrize(
    ("jobs", "settings", "message"),
    [
        (
            [Job(name="xsum", lengths=[100] * 17 + [9000], global_batch_size=4)],
            dict(capacity=8192),
            r"sample 17 of job 'xsum' has 9000 tokens, more than capacity=8192; raise capacity or truncate samples",
        ),
        (
            [Job(name="a", lengths=[10], global_batch_size=1)],
            dict(capacity=8000, pad_multiple=128),
            r"capacity=8000 is not a multiple of pad_multiple=128; use a capacity such as 7936 or 8064",
        ),
        ([], dict(), r"no jobs given"),
        (
            [Job(name="a", lengths=[10], global_batch_size=1), Job(name="a", lengths=[5], global_batch_size=1)],
            dict(),
            r"job name 'a' is used twice",
        ),
        ([Job(name="a", lengths=[10], global_batch_size=1)], dict(stages=0), "stages must be a positive integer"),
        ([Job(name="a", lengths=[10], global_batch_size=1)], dict(solver="milp"), "solver must be 'cpsat' or 'greedy'"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(jobs, settings, message):
    with pytest.raises(ValueError, match=message):
        schedule(jobs, **settings)


def test_empty_job_is_rejected():
    with pytest.raises(ValueError, match=r"job 'empty' has no samples \(lengths is empty\)"):
        Job(name="empty", lengths=[], global_batch_size=4)
