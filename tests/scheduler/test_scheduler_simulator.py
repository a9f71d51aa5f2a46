"""1F1B simulator on hand-computable cases."""

from __future__ import annotations

import pytest

from lorafusion_compiler.scheduler import Microbatch, StageCosts, simulate
from lorafusion_compiler.scheduler.simulator import one_f_one_b_order

F = 1.0e-6  # seconds per token (forward); backward defaults to 2F
P = 1000  # padded tokens per microbatch -> forward a = 1 ms, backward 2 ms
A = P * F


def job_mb(job, step, index):
    return Microbatch(items=[(job, step, index)], padded_tokens=P)


def test_two_equal_microbatches_on_two_stages():
    # stage 0: F0 [0,a]  F1 [a,2a]  B0 [4a,6a]  B1 [7a,9a]
    # stage 1: F0 [a,2a] B0 [2a,4a] F1 [4a,5a]  B1 [5a,7a]
    sim = simulate([job_mb("x", 0, 0), job_mb("x", 0, 1)], stages=2, costs=StageCosts(forward_s_per_token=F))
    assert sim.makespan_s == pytest.approx(9 * A)
    assert sim.busy_s == pytest.approx([6 * A, 6 * A])
    assert sim.idle_s == pytest.approx([3 * A, 3 * A])
    assert sim.bubble_ratio == pytest.approx(1 / 3)
    assert sim.job_step_time_s["x"] == pytest.approx(9 * A)


def test_optimizer_rule_flushes_between_steps_of_a_lone_job():
    # Two steps of one job separated by a no-op (S=2): each step runs alone, 6a each.
    mbs = [job_mb("x", 0, 0), Microbatch(), job_mb("x", 1, 1)]
    sim = simulate(mbs, stages=2)
    assert sim.makespan_s == pytest.approx(12 * A)
    assert sim.bubble_ratio == pytest.approx(0.5)
    assert sim.job_step_time_s["x"] == pytest.approx(6 * A)


def test_single_stage_has_no_bubble():
    sim = simulate([job_mb("x", 0, 0), job_mb("x", 1, 1)], stages=1)
    assert sim.makespan_s == pytest.approx(6 * A)
    assert sim.bubble_ratio == pytest.approx(0.0)


def test_per_stage_costs():
    costs = StageCosts(forward_s_per_token=[F, 2 * F], backward_s_per_token=[F, F])
    sim = simulate([job_mb("x", 0, 0)], stages=2, costs=costs)
    # F on s0 [0,a], F on s1 [a,3a], B on s1 [3a,4a], B on s0 [4a,5a]
    assert sim.makespan_s == pytest.approx(5 * A)
    assert sim.busy_s == pytest.approx([2 * A, 3 * A])


def test_order_violating_the_dependency_rule_deadlocks():
    with pytest.raises(ValueError, match="deadlocks"):
        simulate([job_mb("x", 0, 0), job_mb("x", 1, 1)], stages=2)


def test_costs_must_match_stages():
    with pytest.raises(ValueError, match="has 3 entries but the pipeline has 2 stages"):
        simulate([job_mb("x", 0, 0)], stages=2, costs=StageCosts(forward_s_per_token=[F, F, F]))


def test_one_f_one_b_order():
    assert one_f_one_b_order(0, 4, 5) == [
        ("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0), ("F", 4), ("B", 1), ("B", 2), ("B", 3), ("B", 4)
    ]
    assert one_f_one_b_order(3, 4, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
