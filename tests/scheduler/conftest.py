"""Fixtures for the scheduler tests: an independent schedule checker and instance builders."""

from __future__ import annotations

import random

import pytest

from lorafusion_compiler.scheduler import Job, Schedule, synthetic_jobs


def _round_up(tokens: int, multiple: int) -> int:
    return (tokens + multiple - 1) // multiple * multiple


def independent_check(plan: Schedule) -> None:
    """Re-check a plan without the package's verifier (exactly-once, capacity, order, distance)."""
    cfg = plan.config
    lengths = {job.name: job.lengths for job in plan.jobs}
    expected = {
        (job.name, step, index)
        for job in plan.jobs
        for step in range(job.num_steps)
        for index in range(
            (step % job.steps_per_epoch) * job.global_batch_size,
            min((step % job.steps_per_epoch + 1) * job.global_batch_size, len(job.lengths)),
        )
    }
    got = [item for mb in plan.microbatches for item in mb.items]
    assert len(got) == len(set(got)), "a sample is scheduled twice"
    assert set(got) == expected, "scheduled samples differ from the expected (job, step, sample) set"
    for mb in plan.microbatches:
        padded = sum(_round_up(lengths[job][index], cfg.pad_multiple) for job, _, index in mb.items)
        assert padded == mb.padded_tokens <= cfg.capacity
        assert mb.is_noop == (not mb.items)
    steps_at = [{job: step for job, step, _ in mb.items} for mb in plan.microbatches]
    for p, here in enumerate(steps_at):
        assert len({(job, step) for job, step, _ in plan.microbatches[p].items}) == len(here), (
            f"microbatch {p} holds two steps of one job"
        )
        for q in range(p + 1, min(len(steps_at), p + cfg.stages)):
            for job, step in here.items():
                other = steps_at[q].get(job)
                assert other is None or other == step, (
                    f"job {job}: steps {step} and {other} only {q - p} positions apart (S={cfg.stages})"
                )
    last_step: dict[str, int] = {}
    for here in steps_at:
        for job, step in here.items():
            assert step >= last_step.get(job, 0), f"job {job}: step {step} after step {last_step[job]}"
            last_step[job] = step


def random_instance(rng: random.Random) -> tuple[list[Job], dict]:
    """A small random instance: 1-6 jobs, random capacity, padding, stages, epochs, steps."""
    pad = rng.choice([1, 16, 64, 128])
    capacity = pad * rng.randint(max(1, 64 // pad), max(2, 2048 // pad))
    jobs = []
    for j in range(rng.randint(1, 6)):
        n = rng.randint(1, 40)
        long_share = rng.random() * 0.3
        lengths = [
            rng.randint(1, capacity) if rng.random() < long_share else rng.randint(1, max(1, capacity // 4))
            for _ in range(n)
        ]
        jobs.append(
            Job(
                name=f"job{j}",
                lengths=lengths,
                global_batch_size=rng.randint(1, 12),
                epochs=rng.choice([1, 1, 2]),
                max_steps=rng.choice([None, None, 3]),
            )
        )
    settings = dict(
        capacity=capacity,
        pad_multiple=pad,
        stages=rng.randint(1, 6),
        max_group_microbatches=rng.choice([1, 2, 8]),
    )
    return jobs, settings


@pytest.fixture
def check_plan():
    """The independent checker, as a fixture."""
    return independent_check


@pytest.fixture(scope="session")
def hundred_jobs() -> list[Job]:
    """100 jobs x 100 samples (xsum / cnn_dailymail / wikisum cycled), G=16."""
    return synthetic_jobs(100, 100, global_batch_size=16, seed=0, max_tokens=8192)


@pytest.fixture
def make_instance():
    """``make_instance(rng) -> (jobs, settings)``: a small random instance."""
    return random_instance
