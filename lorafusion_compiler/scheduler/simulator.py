"""Discrete-event simulation of a schedule on an S-stage 1F1B pipeline (times in seconds).

Every stage runs its microbatches in the fixed 1F1B order: ``min(S - s - 1, M)`` warm-up
forwards on stage ``s``, then alternating one forward / one backward, then the remaining
backwards. An operation starts when its stage is free and its inputs are ready: the
forward of microbatch ``i`` on stage ``s`` needs that forward on stage ``s - 1``; the
backward on stage ``s`` needs the backward on ``s + 1`` (on the last stage, its own
forward). Optimizer rule: a microbatch holding step ``t + 1`` of a job cannot start its
forward on stage 0 before the backward of the last microbatch holding step ``t`` of the
job has finished on stage 0. A microbatch costs ``padded_tokens x`` the stage's per-token
cost; no-ops cost nothing (they only occupy a slot of the 1F1B order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .microbatch import Microbatch

__all__ = ["PipelineOp", "SimulationResult", "StageCosts", "one_f_one_b_order", "simulate"]


@dataclass(kw_only=True)
class StageCosts:
    """Per-token compute cost of each pipeline stage (seconds per padded token)."""

    forward_s_per_token: float | Sequence[float] = 1.0e-6
    """Forward cost per padded token: one value for all stages, or one per stage."""
    backward_s_per_token: float | Sequence[float] | None = None
    """Backward cost per padded token (same forms); ``None`` means 2x the forward cost."""

    def per_stage(self, stages: int) -> tuple[list[float], list[float]]:
        """Forward and backward cost per padded token for each of ``stages`` stages (seconds)."""
        forward = _expand(self.forward_s_per_token, stages, "forward_s_per_token")
        if self.backward_s_per_token is None:
            return forward, [2.0 * f for f in forward]
        return forward, _expand(self.backward_s_per_token, stages, "backward_s_per_token")


def _expand(value: float | Sequence[float], stages: int, what: str) -> list[float]:
    values = [float(value)] * stages if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != stages:
        raise ValueError(f"{what} has {len(values)} entries but the pipeline has {stages} stages")
    if any(v < 0 for v in values):
        raise ValueError(f"{what} must be >= 0 seconds per token, got {values}")
    return values


@dataclass(kw_only=True)
class PipelineOp:
    """One forward ("F") or backward ("B") of one microbatch on one stage."""

    stage: int
    """Stage index, 0 = first."""
    microbatch: int
    """Position of the microbatch in the schedule."""
    kind: str
    """``"F"`` or ``"B"``."""
    start_s: float
    """Start time (seconds)."""
    end_s: float
    """End time (seconds)."""


@dataclass(kw_only=True)
class SimulationResult:
    """Timeline and utilization of one simulated schedule."""

    stages: int
    """Number of pipeline stages S."""
    makespan_s: float
    """Time from the first forward to the last backward (seconds)."""
    busy_s: list[float]
    """Compute time per stage (seconds)."""
    idle_s: list[float]
    """Idle time per stage within the makespan (seconds)."""
    bubble_ratio: float
    """Mean over stages of idle / makespan."""
    job_step_time_s: dict[str, float]
    """Per job: time of its last optimizer step / its number of steps (seconds per step)."""
    ops: list[PipelineOp]
    """All operations, in simulation order."""


def one_f_one_b_order(stage: int, stages: int, count: int) -> list[tuple[str, int]]:
    """The 1F1B operation order ``[(kind, microbatch), ...]`` of ``stage`` for ``count`` microbatches."""
    warmup = min(stages - stage - 1, count)
    order = [("F", i) for i in range(warmup)]
    for i in range(count - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(count - warmup, count)]
    return order


def _optimizer_deps(microbatches: Sequence[Microbatch]) -> tuple[list[list[int]], dict[str, list[int]]]:
    """Per microbatch, positions whose stage-0 backward must finish before its forward;
    per job, the last position of each step."""
    last: dict[tuple[str, int], int] = {}
    for position, mb in enumerate(microbatches):
        for key in mb.job_steps:
            last[key] = position
    deps = [
        sorted({last[job, step - 1] for job, step in mb.job_steps if step > 0 and (job, step - 1) in last})
        for mb in microbatches
    ]
    step_ends: dict[str, list[int]] = {}
    for (job, _step), position in sorted(last.items()):
        step_ends.setdefault(job, []).append(position)
    return deps, step_ends


def simulate(microbatches: Sequence[Microbatch], *, stages: int, costs: StageCosts | None = None) -> SimulationResult:
    """Simulate the schedule on ``stages`` 1F1B stages; see the module docstring.

    Raises ValueError if the order deadlocks (a schedule that breaks the dependency rule).
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    forward, backward = (costs or StageCosts()).per_stage(stages)
    count = len(microbatches)
    orders = [one_f_one_b_order(s, stages, count) for s in range(stages)]
    deps, step_ends = _optimizer_deps(microbatches)
    end: dict[tuple[str, int, int], float] = {}
    free = [0.0] * stages
    cursor = [0] * stages
    ops: list[PipelineOp] = []
    progress = True
    while progress:
        progress = False
        for s in range(stages):
            while cursor[s] < len(orders[s]):
                kind, i = orders[s][cursor[s]]
                if kind == "F":
                    needs = [("F", i, s - 1)] if s > 0 else [("B", p, 0) for p in deps[i]]
                else:
                    needs = [("B", i, s + 1)] if s < stages - 1 else [("F", i, s)]
                if any(need not in end for need in needs):
                    break
                start = max([free[s], *(end[need] for need in needs)])
                cost = forward[s] if kind == "F" else backward[s]
                finish = start + microbatches[i].padded_tokens * cost
                end[kind, i, s] = finish
                free[s] = finish
                ops.append(PipelineOp(stage=s, microbatch=i, kind=kind, start_s=start, end_s=finish))
                cursor[s] += 1
                progress = True
    if any(cursor[s] < len(orders[s]) for s in range(stages)):
        raise ValueError(
            "the 1F1B order deadlocks: some job starts a step fewer than "
            f"{stages} microbatches after its previous step; verify the schedule first"
        )
    makespan = max(free) if count else 0.0
    busy = [sum(op.end_s - op.start_s for op in ops if op.stage == s) for s in range(stages)]
    idle = [makespan - b for b in busy]
    bubble = sum(idle) / (stages * makespan) if makespan > 0 else 0.0
    step_time = {job: end["B", ends[-1], 0] / len(ends) for job, ends in step_ends.items()}
    return SimulationResult(
        stages=stages,
        makespan_s=makespan,
        busy_s=busy,
        idle_s=idle,
        bubble_ratio=bubble,
        job_step_time_s=step_time,
        ops=ops,
    )
