"""Negative tests: the verifier catches each kind of hand-made violation."""

from __future__ import annotations

import pytest

from lorafusion_compiler.scheduler import Job, Microbatch, ScheduleError, verify_schedule

# a: 4 samples of 100 tokens, G=2 -> step 0 = {0, 1}, step 1 = {2, 3}; padded 128 each.
# b: 2 samples of 50 tokens, G=2 -> step 0 = {0, 1}; padded 64 each.
JOBS = [
    Job(name="a", lengths=[100, 100, 100, 100], global_batch_size=2),
    Job(name="b", lengths=[50, 50], global_batch_size=2),
]
SETTINGS = dict(capacity=256, pad_multiple=64, stages=2)


def mb(*items, padded=None):
    padded_tokens = padded
    if padded_tokens is None:
        padded_tokens = sum(128 if job == "a" else 64 for job, _, _ in items)
    return Microbatch(items=list(items), padded_tokens=padded_tokens)


def valid():
    return [mb(("a", 0, 0), ("a", 0, 1)), mb(("b", 0, 0), ("b", 0, 1)), mb(("a", 1, 2), ("a", 1, 3))]


def test_valid_schedule_passes():
    verify_schedule(valid(), JOBS, **SETTINGS)
    # A no-op instead of b also satisfies the distance rule.
    verify_schedule(
        [valid()[0], Microbatch(), valid()[2]], JOBS[:1], **SETTINGS
    )


@pytest.mark.parametrize(
    ("microbatches", "message"),
    [
        (  # capacity: 128 + 128 + 64 = 320 > 256
            [mb(("a", 0, 0), ("a", 0, 1), ("b", 0, 0)), mb(("b", 0, 1)), mb(("a", 1, 2), ("a", 1, 3))],
            r"microbatch 0 holds 320 padded tokens, more than capacity=256",
        ),
        (  # wrong padded_tokens record
            [mb(("a", 0, 0), ("a", 0, 1), padded=200), valid()[1], valid()[2]],
            r"reports padded_tokens=200, but its samples pad to 256",
        ),
        (  # unknown job
            [*valid(), mb(("c", 0, 0))],
            r"unknown job 'c'",
        ),
        (  # sample tagged with the wrong step
            [mb(("a", 0, 0), ("a", 0, 2)), valid()[1], mb(("a", 1, 1), ("a", 1, 3))],
            r"sample 2 of job 'a' tagged step 0, but step 0 holds samples 0..1",
        ),
        (  # step out of range
            [*valid(), mb(("b", 3, 0))],
            r"job 'b' has steps 0..0",
        ),
        (  # duplicate
            [valid()[0], mb(("b", 0, 0), ("b", 0, 1), ("b", 0, 1)), valid()[2]],
            r"sample 1 of job 'b' \(step 0\) appears 2 times",
        ),
        (  # missing
            [valid()[0], mb(("b", 0, 0)), valid()[2]],
            r"job 'b' step 0: samples \[1\] are never scheduled",
        ),
        (  # step order
            [valid()[2], valid()[1], valid()[0]],
            r"job 'a': step 1 starts at microbatch 0, before step 0 ends at microbatch 2",
        ),
        (  # distance rule: steps 0 and 1 of a adjacent with S=2
            [valid()[0], valid()[2], valid()[1]],
            r"job 'a': step 1 starts at microbatch 1, only 1 positions after step 0 ends at microbatch 0; "
            r"1F1B with stages=2 needs >= 2",
        ),
        (  # two steps of one job in one microbatch
            [mb(("a", 0, 0), ("a", 1, 2)), mb(("a", 0, 1), ("a", 1, 3)), valid()[1]],
            r"microbatch 0 holds steps \[0, 1\] of job 'a'",
        ),
    ],
)
def test_violation_is_reported(microbatches, message):
    with pytest.raises(ScheduleError, match=message):
        verify_schedule(microbatches, JOBS, **SETTINGS)


def test_distance_rule_depends_on_stages():
    schedule = valid()
    verify_schedule(schedule, JOBS, capacity=256, pad_multiple=64, stages=2)
    with pytest.raises(ScheduleError, match="needs >= 3"):
        verify_schedule(schedule, JOBS, capacity=256, pad_multiple=64, stages=3)


def test_error_lists_every_violation():
    with pytest.raises(ScheduleError) as info:
        verify_schedule([valid()[2], valid()[0]], JOBS, **SETTINGS)
    assert len(info.value.violations) == 2  # step order for 'a' + b never scheduled
