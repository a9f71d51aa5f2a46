"""Verifier for finished schedules: capacity, exactly-once, step order, 1F1B distance rule."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from .jobs import Job, round_up
from .microbatch import Microbatch

__all__ = ["ScheduleError", "verify_schedule"]

_SHOWN = 10


class ScheduleError(ValueError):
    """A schedule violates capacity, exactly-once, step order or the dependency rule."""

    def __init__(self, violations: Sequence[str]) -> None:
        self.violations = list(violations)
        shown = "\n  ".join(self.violations[:_SHOWN])
        more = len(self.violations) - _SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"invalid schedule ({len(self.violations)} violations):\n  {shown}{tail}")


def _check_microbatch(
    position: int, mb: Microbatch, jobs: dict[str, Job], capacity: int, pad_multiple: int
) -> list[str]:
    problems = []
    padded = 0
    steps: dict[str, set[int]] = defaultdict(set)
    for item in mb.items:
        job_name, step, index = item
        job = jobs.get(job_name)
        if job is None:
            problems.append(f"microbatch {position} holds {item!r} of unknown job {job_name!r}")
            continue
        if not 0 <= step < job.num_steps:
            problems.append(
                f"microbatch {position} holds {item!r}: job {job_name!r} has steps 0..{job.num_steps - 1}"
            )
            continue
        samples = job.step_samples(step)
        if index not in samples:
            problems.append(
                f"microbatch {position} holds sample {index} of job {job_name!r} tagged step {step}, "
                f"but step {step} holds samples {samples.start}..{samples.stop - 1}"
            )
            continue
        padded += round_up(job.lengths[index], pad_multiple)
        steps[job_name].add(step)
    if padded > capacity:
        problems.append(
            f"microbatch {position} holds {padded} padded tokens, more than capacity={capacity}"
        )
    if not problems and padded != mb.padded_tokens:
        problems.append(
            f"microbatch {position} reports padded_tokens={mb.padded_tokens}, but its samples pad to {padded}"
        )
    for job_name, held in sorted(steps.items()):
        if len(held) > 1:
            problems.append(
                f"microbatch {position} holds steps {sorted(held)} of job {job_name!r}; "
                "a microbatch may hold one step per job"
            )
    return problems


def verify_schedule(
    microbatches: Sequence[Microbatch],
    jobs: Sequence[Job],
    *,
    capacity: int,
    pad_multiple: int,
    stages: int,
) -> None:
    """Raise ScheduleError unless the ordered microbatches form a valid schedule.

    Checks: every microbatch fits ``capacity`` (padded tokens) and reports its padded
    tokens correctly; every sample of every scheduled step of every job appears exactly
    once, tagged with its own step; all microbatches holding step ``t`` of a job come
    before those holding step ``t + 1``; and two microbatches fewer than ``stages``
    positions apart never hold different steps of the same job.
    """
    by_name = {job.name: job for job in jobs}
    problems: list[str] = []
    seen: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    span: dict[tuple[str, int], list[int]] = {}
    for position, mb in enumerate(microbatches):
        problems.extend(_check_microbatch(position, mb, by_name, capacity, pad_multiple))
        for item in mb.items:
            seen[item].append(position)
            first_last = span.setdefault((item[0], item[1]), [position, position])
            first_last[1] = position
    for item, positions in seen.items():
        if len(positions) > 1:
            problems.append(
                f"sample {item[2]} of job {item[0]!r} (step {item[1]}) appears {len(positions)} times, "
                f"in microbatches {positions}"
            )
    for job in jobs:
        for step in range(job.num_steps):
            missing = [i for i in job.step_samples(step) if (job.name, step, i) not in seen]
            if missing:
                problems.append(
                    f"job {job.name!r} step {step}: samples {missing[:_SHOWN]} are never scheduled"
                )
            if step + 1 >= job.num_steps or (job.name, step) not in span or (job.name, step + 1) not in span:
                continue
            last = span[job.name, step][1]
            first_next = span[job.name, step + 1][0]
            if first_next <= last:
                problems.append(
                    f"job {job.name!r}: step {step + 1} starts at microbatch {first_next}, "
                    f"before step {step} ends at microbatch {last}"
                )
            elif first_next - last < stages:
                problems.append(
                    f"job {job.name!r}: step {step + 1} starts at microbatch {first_next}, only "
                    f"{first_next - last} positions after step {step} ends at microbatch {last}; "
                    f"1F1B with stages={stages} needs >= {stages}"
                )
    if problems:
        raise ScheduleError(problems)
