"""The ``schedule()`` entry point: grouping -> packing -> merge/sequencing -> verify -> simulate."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .grouping import group_jobs
from .jobs import Item, Job, round_up, validate_capacity, validate_jobs
from .merge import sequence_rounds
from .microbatch import Microbatch
from .packing import STATUS_ORDER, PackReport, pack_all
from .simulator import SimulationResult, StageCosts, simulate
from .verify import verify_schedule

__all__ = ["Schedule", "ScheduleConfig", "ScheduleStats", "schedule"]


@dataclass(kw_only=True)
class ScheduleConfig:
    """Settings of one planning run."""

    capacity: int = 8192
    """Token capacity of every microbatch (padded tokens); a multiple of ``pad_multiple``."""
    pad_multiple: int = 128
    """Each sample is padded to a multiple of this many tokens (the kernel's BLOCK_M row block)."""
    stages: int = 4
    """Pipeline stages S of the 1F1B schedule (S = 1: no pipeline, no distance rule)."""
    time_limit_s: float = 2.0
    """CP-SAT budget (seconds) shared by the subproblems greedy could not prove optimal; enforced
    through CP-SAT's deterministic time, so actual wall time can differ (see ``cpsat.py``)."""
    seed: int = 0
    """CP-SAT random seed; same inputs and seed give the same schedule."""
    solver: Literal["cpsat", "greedy"] = "cpsat"
    """``"cpsat"``: greedy warm start + CP-SAT; ``"greedy"``: greedy packing only."""
    max_group_microbatches: int = 8
    """Target microbatches per group and round; bounds the packing subproblem size."""
    costs: StageCosts = field(default_factory=StageCosts)
    """Per-token stage costs for the simulation (seconds per padded token)."""

    def __post_init__(self) -> None:
        validate_capacity(self.capacity, self.pad_multiple)
        for name in ("stages", "max_group_microbatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.time_limit_s >= 0:
            raise ValueError(f"time_limit_s must be >= 0 seconds, got {self.time_limit_s!r}")
        if self.solver not in ("cpsat", "greedy"):
            raise ValueError(f"solver must be 'cpsat' or 'greedy', got {self.solver!r}")
        self.costs.per_stage(self.stages)


@dataclass(kw_only=True)
class ScheduleStats:
    """Quality and cost figures of a plan."""

    bins: int
    """Microbatches holding samples."""
    noops: int
    """No-op microbatches inserted to honor the dependency rule."""
    lower_bound: int
    """ceil(total padded tokens / capacity): no plan can use fewer bins."""
    packed_bins: int
    """Bins after per-(group, step) packing, before the merge pass."""
    greedy_bins: int
    """Bins the greedy packing alone would have used per subproblem, summed."""
    fill: float
    """Padded tokens / (bins x capacity)."""
    solver_status: str
    """Worst subproblem status: ``OPTIMAL`` < ``FEASIBLE`` < ``GREEDY``."""
    status_counts: dict[str, int]
    """Subproblems per status."""
    subproblems: int
    """Packing subproblems (one per group and round)."""
    solver_calls: int
    """Subproblems handed to CP-SAT (the others were proved optimal by bounds or greedy-only)."""
    solve_time_s: float
    """Packing time, greedy + CP-SAT (seconds)."""
    plan_time_s: float
    """Whole ``schedule()`` call: packing, merge, verification and simulation (seconds)."""
    groups: list[list[str]]
    """Job names per group."""
    moved_samples: int
    """Samples the merge pass moved into another microbatch."""
    absorbed_bins: int
    """Packed bins the merge pass emptied."""
    bubble_ratio: float
    """Simulated 1F1B bubble ratio, mean over stages of idle / makespan."""
    makespan_s: float
    """Simulated time of the whole schedule (seconds)."""


@dataclass(kw_only=True)
class Schedule:
    """A verified plan: the ordered microbatches fed to the pipeline, plus stats and simulation."""

    microbatches: list[Microbatch]
    """Microbatches in pipeline order (no-ops included)."""
    jobs: list[Job]
    """The scheduled jobs."""
    config: ScheduleConfig
    """Settings the plan was made with."""
    stats: ScheduleStats
    """Quality and cost figures."""
    simulation: SimulationResult
    """The simulated 1F1B timeline."""

    def verify(self) -> None:
        """Raise ScheduleError on any capacity, exactly-once, step-order or distance violation."""
        verify_schedule(
            self.microbatches,
            self.jobs,
            capacity=self.config.capacity,
            pad_multiple=self.config.pad_multiple,
            stages=self.config.stages,
        )

    def write_timeline(self, path: str | Path) -> Path:
        """Draw the simulated pipeline timeline as a PNG at ``path``."""
        from .timeline import draw_timeline  # matplotlib is imported only when drawing

        return draw_timeline(
            self.simulation,
            self.microbatches,
            {job.name: tuple(job.lengths) for job in self.jobs},
            self.config.pad_multiple,
            path,
        )

    def summary(self) -> str:
        """A human-readable multi-line plan summary."""
        s, c, sim = self.stats, self.config, self.simulation
        counts = ", ".join(f"{n} {k}" for k, n in sorted(s.status_counts.items()))
        tokens = sum(mb.tokens for mb in self.microbatches)
        padded = sum(mb.padded_tokens for mb in self.microbatches)
        step_times = sorted(sim.job_step_time_s.values())
        lines = [
            f"jobs: {len(self.jobs)} in {len(s.groups)} groups: "
            + " | ".join(", ".join(group) for group in s.groups),
            f"microbatches: {s.bins + s.noops} ({s.bins} with samples, {s.noops} no-ops); "
            f"lower bound {s.lower_bound}; fill {s.fill:.1%} of capacity={c.capacity} "
            f"(pad_multiple={c.pad_multiple}; padding adds {padded / tokens - 1:.1%} to {tokens} tokens)",
            f"packing: {s.subproblems} subproblems, solver status {s.solver_status} ({counts}), "
            f"{s.solver_calls} CP-SAT calls, {s.solve_time_s:.3f} s; greedy alone {s.greedy_bins} bins, "
            f"packed {s.packed_bins}",
            f"merge pass: moved {s.moved_samples} samples, absorbed {s.absorbed_bins} bins",
            f"simulated 1F1B, {c.stages} stages: makespan {sim.makespan_s:.4f} s, "
            f"bubble ratio {s.bubble_ratio:.2%}, idle per stage "
            + ", ".join(f"{i:.4f}" for i in sim.idle_s)
            + " s",
            f"time per optimizer step over jobs: min {step_times[0]:.4f} s, "
            f"mean {sum(step_times) / len(step_times):.4f} s, max {step_times[-1]:.4f} s",
            f"planned in {s.plan_time_s:.3f} s",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: settings, microbatches (items + padded tokens) and stats."""
        return {
            "capacity": self.config.capacity,
            "pad_multiple": self.config.pad_multiple,
            "stages": self.config.stages,
            "microbatches": [
                {"items": [list(item) for item in mb.items], "padded_tokens": mb.padded_tokens, "tokens": mb.tokens}
                for mb in self.microbatches
            ],
            "stats": asdict(self.stats),
        }

    def write_json(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON at ``path``."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=1))
        return out


def _rounds_of(groups: list[list[str]], by_name: dict[str, Job]) -> list[list[list[Item]]]:
    """Items of every (group, round): round r holds step r of each job of the group."""
    rounds = []
    for names in groups:
        count = max(by_name[name].num_steps for name in names)
        rounds.append(
            [
                [item for name in names if r < by_name[name].num_steps for item in by_name[name].step_items(r)]
                for r in range(count)
            ]
        )
    return rounds


def _pack_rounds(
    rounds: list[list[list[Item]]], size: Callable[[Item], int], config: ScheduleConfig
) -> tuple[list[list[list[list[Item]]]], PackReport]:
    """Pack every (group, round) subproblem; return the bins as item lists, same nesting."""
    flat = [items for group_rounds in rounds for items in group_rounds]
    report = pack_all(
        [[size(item) for item in items] for items in flat],
        config.capacity // config.pad_multiple,
        time_limit_s=config.time_limit_s,
        seed=config.seed,
        use_solver=config.solver == "cpsat",
    )
    packed = iter(
        [[items[i] for i in b] for b in result.bins] for items, result in zip(flat, report.results, strict=True)
    )
    return [[next(packed) for _ in group_rounds] for group_rounds in rounds], report


def schedule(jobs: Sequence[Job], **settings: Any) -> Schedule:
    """Plan the microbatches of several LoRA jobs sharing one pipelined base model.

    ``settings`` are the fields of ScheduleConfig: ``capacity`` (tokens per microbatch),
    ``pad_multiple`` (tokens), ``stages``, ``time_limit_s`` (seconds of CP-SAT budget),
    ``seed``, ``solver``, ``max_group_microbatches``, ``costs``. The result is verified
    (capacity, exactly-once, step order, 1F1B distance rule) before it is returned.
    """
    start = time.perf_counter()
    config = ScheduleConfig(**settings)
    jobs = list(jobs)
    validate_jobs(jobs, config.capacity, config.pad_multiple)
    by_name = {job.name: job for job in jobs}
    pad = config.pad_multiple
    units = {job.name: [round_up(n, pad) // pad for n in job.lengths] for job in jobs}

    def size(item: Item) -> int:
        return units[item[0]][item[2]]

    groups = group_jobs(
        jobs,
        capacity=config.capacity,
        pad_multiple=pad,
        stages=config.stages,
        max_group_microbatches=config.max_group_microbatches,
    )
    packed_rounds, report = _pack_rounds(_rounds_of(groups, by_name), size, config)
    sequenced = sequence_rounds(packed_rounds, size=size, capacity=config.capacity // pad, stages=config.stages)
    microbatches = [
        Microbatch(
            items=items,
            padded_tokens=sum(size(item) for item in items) * pad,
            tokens=sum(by_name[item[0]].lengths[item[2]] for item in items),
        )
        for items in sequenced.microbatches
    ]
    verify_schedule(microbatches, jobs, capacity=config.capacity, pad_multiple=pad, stages=config.stages)
    simulation = simulate(microbatches, stages=config.stages, costs=config.costs)
    total_padded = sum(mb.padded_tokens for mb in microbatches)
    bins = sum(not mb.is_noop for mb in microbatches)
    counts = Counter(result.status for result in report.results)
    stats = ScheduleStats(
        bins=bins,
        noops=len(microbatches) - bins,
        lower_bound=-(-total_padded // config.capacity),
        packed_bins=sum(len(result.bins) for result in report.results),
        greedy_bins=sum(result.greedy_bins for result in report.results),
        fill=total_padded / (bins * config.capacity),
        solver_status=max(counts, key=STATUS_ORDER.index),
        status_counts=dict(sorted(counts.items())),
        subproblems=len(report.results),
        solver_calls=sum(result.solver_called for result in report.results),
        solve_time_s=report.solve_time_s,
        plan_time_s=0.0,
        groups=groups,
        moved_samples=sequenced.moved_items,
        absorbed_bins=sequenced.absorbed_bins,
        bubble_ratio=simulation.bubble_ratio,
        makespan_s=simulation.makespan_s,
    )
    stats.plan_time_s = time.perf_counter() - start
    return Schedule(microbatches=microbatches, jobs=jobs, config=config, stats=stats, simulation=simulation)
